"""ShuffleMamba: Vision Mamba models trained with Stochastic Layer-Wise Shuffle (SLWS)."""

from ._compat import ensure_torchvision

ensure_torchvision()  # before anything imports timm

from .ops import selective_scan, selective_scan_ref  # noqa: E402

__version__ = "0.1.0"
__all__ = ["selective_scan", "selective_scan_ref", "__version__"]
