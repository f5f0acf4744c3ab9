"""Guarded compatibility step for torchvision builds whose compiled ops cannot load.

Some environments ship a CUDA build of torchvision next to a CPU build of torch. Its Python
parts (transforms, datasets) work, but ``import torchvision`` fails with
"operator torchvision::nms does not exist" because the compiled library that defines the op
schemas cannot be loaded. timm imports torchvision, so we define the two schemas its Python
side registers fake kernels for, then import again. On a normal install this does nothing.
"""

from __future__ import annotations

import importlib
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it deletes the schemas
applied = False


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first if (and only if) needed."""
    global _library, applied
    try:
        importlib.import_module("torchvision")
        return
    except ModuleNotFoundError:
        return  # torchvision absent: timm will say so itself when it needs it
    except (RuntimeError, AttributeError) as err:
        if "torchvision::" not in str(err):
            raise
    _purge_torchvision()
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            _library.define(schema)
    applied = True
    importlib.import_module("torchvision")
