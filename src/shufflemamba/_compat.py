"""Guarded compatibility step for torchvision builds whose compiled ops cannot load.

Some environments ship a CUDA build of torchvision next to a CPU build of torch. Its Python
parts (transforms, datasets) work, but ``import torchvision`` fails with
"operator torchvision::nms does not exist" because the compiled library that defines the op
schemas cannot be loaded. timm imports torchvision, so the two schemas its Python side registers
fake kernels for must exist before torchvision is imported. On a normal install this does nothing.

Two ways in, sharing :func:`define_missing_schemas`:
- ``import shufflemamba`` calls :func:`ensure_torchvision` (works when shufflemamba comes first);
- ``python src/shufflemamba/_compat.py install-hook`` (the Makefile runs it only where the plain
  import fails) writes a ``.pth`` file into the environment that loads this file at start-up and
  adds an import hook, so ``import timm`` or ``import torchvision`` first works too. The hook
  imports nothing until torchvision is asked for, so other programs start as fast as before.

This file imports only the standard library at the top: the ``.pth`` line loads it on its own,
outside the package, at every interpreter start.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
PTH_NAME = "shufflemamba-torchvision-schemas.pth"
_library: Any = None  # a torch.library.Library kept alive: dropping it deletes the schemas
applied = False


def define_missing_schemas() -> None:
    """Define the torchvision op schemas that no loaded library has defined."""
    global _library, applied
    import torch

    for name, schema in SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            if _library is None:
                _library = torch.library.Library("torchvision", "DEF")
            _library.define(schema)
            applied = True


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first if (and only if) needed."""
    try:
        importlib.import_module("torchvision")
        return
    except ModuleNotFoundError:
        return  # torchvision absent: timm will say so itself when it needs it
    except (RuntimeError, AttributeError) as err:
        if "torchvision::" not in str(err):
            raise
    _purge_torchvision()
    define_missing_schemas()
    importlib.import_module("torchvision")


class _SchemasBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Defines the schemas the first time torchvision is imported, then steps aside."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None  # the normal finders load the module


def install_import_hook() -> None:
    """Called by the ``.pth`` line at interpreter start-up."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _SchemasBeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _SchemasBeforeTorchvision())


def pth_line(module_file: str) -> str:
    """The one line of the ``.pth`` file: load this file by path (not the package: that would import
    torch at every start) and install the hook; nothing when the checkout has moved away."""
    return (f"import importlib.util as _u, os as _o; _p = {module_file!r}; "
            "_s = _o.path.isfile(_p) and _u.spec_from_file_location('_shufflemamba_torchvision_schemas', _p); "
            "_m = _s and _u.module_from_spec(_s); _s and _s.loader.exec_module(_m); _m and _m.install_import_hook()\n")


def write_pth(site_packages: str, module_file: str) -> str:
    import os

    path = os.path.join(site_packages, PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(pth_line(module_file))
    return path


if __name__ == "__main__":
    import os
    import sysconfig

    if sys.argv[1:] != ["install-hook"]:
        sys.exit("usage: python src/shufflemamba/_compat.py install-hook")
    print(f"torchvision's compiled ops do not load here; defining their schemas at start-up: "
          f"{write_pth(sysconfig.get_paths()['purelib'], os.path.abspath(__file__))}")
