"""ShuffleMamba: Vision Mamba models trained with Stochastic Layer-Wise Shuffle (SLWS)."""

from .process import tune_openmp

# The `shufflemamba` command's OpenMP wait policy: read by OpenMP when torch loads, which this
# package's import does, so the command's choice is made here. Another program's import changes nothing.
tune_openmp()

from ._compat import ensure_torchvision  # noqa: E402

ensure_torchvision()  # before anything imports timm

from .ops import selective_scan, selective_scan_ref  # noqa: E402
from .slws import LayerShuffle, ShuffledLayer, apply_slws, shuffle_rates  # noqa: E402
from . import models  # noqa: E402  (registers the Vim / ShuffleMamba models in timm)
from .models import VisionMamba, load_checkpoint  # noqa: E402
from .training.runs import load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "selective_scan", "selective_scan_ref", "LayerShuffle", "ShuffledLayer", "apply_slws", "shuffle_rates",
    "models", "VisionMamba", "load_checkpoint", "load_model", "__version__",
]
