"""ShuffleMamba: Vision Mamba models trained with Stochastic Layer-Wise Shuffle (SLWS)."""

import os
import sys

if "torch" not in sys.modules:
    # How idle OpenMP threads wait: a bounded spin on an idle machine, for the shufflemamba command,
    # else PASSIVE (a spinning policy makes 2-thread training several times slower when the cores are
    # shared with other work; see _omp.py). Only takes effect before torch loads its OpenMP runtime;
    # a value the user set wins.
    from ._omp import invoked_as_command, set_wait_policy

    set_wait_policy(os.environ, cli=invoked_as_command(sys.argv, getattr(sys, "orig_argv", [])))

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
