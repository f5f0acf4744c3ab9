"""Test-session setup shared by all test modules."""

import os

import torch

# Triton decides between compiler and CPU interpreter once, when triton itself is first imported
# (timm imports it, so shufflemamba's import does too). Without a GPU the Triton kernels can only be
# tested through the interpreter, so ask for it here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
