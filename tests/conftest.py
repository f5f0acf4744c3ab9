"""Test-session setup shared by all test modules."""

import os

# Idle OpenMP threads sleep instead of spinning: the suite shares its cores with other work. Set here,
# before torch loads OpenMP, since importing shufflemamba leaves the process alone (the command tunes
# its own).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# torch.compile's kernel cache is not keyed on ATEN_CPU_CAPABILITY: a run capped at AVX2 on an AVX-512
# machine (an AVX2-only CPU emulated) loaded kernels that native runs had cached, and the compiled Vim's
# gradients came out NaN (torch 2.13). Such a run gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY'].lower()}")

import torch  # noqa: E402

# Triton decides between compiler and CPU interpreter once, when triton itself is first imported
# (timm imports it, so shufflemamba's import does too). Without a GPU the Triton kernels can only be
# tested through the interpreter, so ask for it here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def make_fashion_idx():
    """Returns make(root, n_train, n_test, n_classes): a random Fashion-MNIST in gzipped IDX files
    under root (28x28 uint8 images, labels i % n_classes), for ``--dataset fashion-mnist --data-dir``."""
    import gzip
    import struct

    import numpy as np

    def make(root, n_train: int, n_test: int, n_classes: int) -> str:
        rng = np.random.default_rng(0)
        n = max(n_train, n_test)
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % n_classes).astype(np.uint8)
        for (fi, fl), k in ((("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"), n_train),
                            (("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), n_test)):
            for name, arr in ((fi, imgs[:k]), (fl, labels[:k])):
                with gzip.open(str(root / name), "wb") as f:
                    f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                            + arr.tobytes())
        return str(root)

    return make
