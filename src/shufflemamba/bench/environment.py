"""What this machine has for ShuffleMamba (``shufflemamba doctor``, and the first section of the GPU check):
versions, the device, and which selective-scan implementations can run here.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from ..ops.mamba_ssm_glue import mamba_ssm_scan, status
from ..ops.selective_scan import resolve_impl
from .report import cpu_model


def _version(mod: str) -> str | None:
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return None


def scan_impls(device: torch.device, with_mamba_ssm: bool = True) -> list[str]:
    """The fast selective-scan implementations that can run on ``device`` here (mamba_ssm only if
    ``with_mamba_ssm``: finding out runs its kernel)."""

    impls = ["torch"]
    if device.type == "cuda":
        try:
            from ..ops.triton_scan import triton_available  # optional: Triton may be absent
        except ImportError:
            pass
        else:
            if triton_available(device):
                impls.append("triton")
    elif device.type == "cpu":
        impls.insert(0, "cpu")
    if with_mamba_ssm and mamba_ssm_scan(device) is not None:  # it imports and a trial call ran here
        impls.append("mamba_ssm")
    return impls


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device, and which scan kernels import (with the reason when one does not)."""

    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": _version("timm"), "triton": _version("triton"), "mamba_ssm": _version("mamba_ssm"),
        "causal_conv1d": _version("causal_conv1d") or _version("causal-conv1d"),
        "kernels": status(device), "scan_impls": scan_impls(device), "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        out.update(device_name=cpu_model())

    out["auto_impl"] = {dt: resolve_impl("auto", device, getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    return out


def describe_environment(env: dict[str, Any]) -> str:
    """``environment()`` as aligned ``name: value`` lines (nested mappings as ``name.key``)."""
    flat: list[tuple[str, Any]] = []
    for key, value in env.items():
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((key, value))
    width = max(len(k) for k, _ in flat)
    return "\n".join(f"{k.ljust(width)}  {_shown(k, v)}" for k, v in flat)


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none (a CPU build of torch)" if key == "cuda" else "not installed"
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
