"""The Triton compile report (`make triton-report`) compiles with the layouts the mixer really passes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import shufflemamba  # noqa: E402,F401  (torchvision shim before timm)
from shufflemamba.models import BiMambaMixer, mamba_mixer  # noqa: E402
from shufflemamba.bench.triton_compile import _example_inputs  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("d_model", [192, 384], ids=["vim_ti", "vim_s"])
def test_example_inputs_have_the_mixers_strides_and_dtypes(monkeypatch, d_model):
    """Capture what the mixer's (B, E, L) path (the CUDA path; autocast stands in for the GPU's bf16)
    hands to selective_scan and compare strides, dtypes and storage offsets with the report's inputs."""
    seen = []

    def capture(*args, **kwargs):
        seen.append(dict(zip(NAMES, args[:5] + (args[5], args[6], kwargs["delta_bias"]))))
        return torch.zeros_like(args[0])

    monkeypatch.setattr(mamba_mixer, "selective_scan", capture)
    batch, L = 2, 197
    mixer = BiMambaMixer(d_model, scan_impl="torch")  # "torch": the (B, E, L) path on the CPU
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(torch.randn(batch, L, d_model))
    assert len(seen) == 2  # both directions pass the same layouts
    E, N = 2 * d_model, mixer.d_state
    ours = _example_inputs(batch, E, L, N, torch.bfloat16)
    for call in seen:
        for name in NAMES:
            real, stand_in = call[name], ours[name]
            assert real.shape == stand_in.shape, name
            assert real.stride() == stand_in.stride(), (name, real.stride(), stand_in.stride())
            assert real.dtype == stand_in.dtype, (name, real.dtype, stand_in.dtype)
            assert real.storage_offset() == stand_in.storage_offset(), name
