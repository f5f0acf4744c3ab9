"""Float32 linear layers on the CPU through oneDNN where it measures faster than torch's BLAS.

torch runs ``F.linear`` on the CPU through its BLAS (MKL in the official wheels), which takes slower code
paths on AMD CPUs: on a 2-core Zen 5 (AVX-512) in_proj's product at 1024 tokens took 1.33 ms on MKL and
0.71 ms on oneDNN (bundled with torch too); capped at AVX2, 1.43 against 1.24 ms (:func:`measure_gemm`'s
record, which ``shufflemamba bench`` prints). :func:`linear` (and :class:`Linear`, the Vim mixer's
``in_proj`` / ``out_proj``) runs the forward and the input gradient through
``torch.ops.mkldnn._linear_pointwise`` (the op inductor emits for CPU linears) when :func:`gemm_backend`
picks oneDNN, and the weight gradient too where that product measured faster there (it ranks the two
libraries apart). oneDNN packs the weight per call into buffers of up to a few
hundred KB: the ``shufflemamba`` command's malloc setting (``process.tune_malloc``) keeps them off fresh
mappings (a process without it maps and faults in those pages on every call).

The backend is SHUFFLEMAMBA_CPU_GEMM (``ops.config``): ``auto`` times both once per CPU, torch version,
thread count and ISA caps, records the result in the kernel cache and reads it from then on (the same
choice in every process, so a resumed run computes what the first did); ``onednn`` / ``blas`` force one.
Traced code (``torch.compile``, ``torch.export``) gets ``F.linear``: inductor makes its own GEMM choices.
"""

from __future__ import annotations

import hashlib
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import config
from ._checks import records_grad
from .cpu_library import read_choice, write_choice

__all__ = ["Choice", "Linear", "convert_linears", "describe_gemm", "gemm_backend", "gemm_choice", "gemm_choice_path",
           "linear", "measure_gemm", "onednn_runs"]

Backend = Literal["onednn", "blas"]
_LIB_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # change what either runs


def _onednn_linear():
    """torch's oneDNN linear op, or None where this torch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def _dnn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _dnn_weight_grad(gy: Tensor, x: Tensor) -> Tensor:
    """gy^T x through oneDNN's linear, for which torch copies a transposed input dense but passes a transposed
    weight as it is: the copy goes to the smaller of gy^T and x^T. Where gy is the wider (in_proj: 768 against
    192 columns), dW^T = x^T gy, returned transposed as a view (autograd's accumulation makes it dense, 0.6 MB
    for in_proj): 1.24 ms against 1.68 with gy^T copied, at Vim-Ti's 1576 tokens (the Zen 5, AVX-512)."""
    if gy.shape[1] > x.shape[1]:
        return _dnn(x.t().contiguous(), gy.t(), None).t()
    return _dnn(gy.t(), x.t(), None)


def gemm_choice_path() -> Path:
    """Where ``auto``'s measurement is recorded for this CPU, torch, thread count and ISA caps: delete it to
    measure again."""
    key = "|".join([config.cpu_signature(), torch.__version__, str(torch.get_num_threads()),
                    *(os.environ.get(v, "") for v in _LIB_CAPS)])
    return config.cache_dir() / f"gemm_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


class Choice(NamedTuple):
    """The library of each product: the forward and input gradient (``forward``), the weight gradient."""

    forward: Backend
    weight_grad: Backend


def _median_ms(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):  # two rounds warm up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def measure_gemm(rounds: int = 15) -> dict[str, Any]:
    """Time torch's BLAS and oneDNN in turn on in_proj's products at 1024 tokens (Vim-Ti, D 192 -> 2E 768): the
    forward ``x W^T`` and the weight gradient ``gy^T x`` (a reduction over rows, which the two libraries rank
    apart: on the Zen 5 oneDNN 0.74 against 1.45 ms with AVX-512, 1.61 against 1.48 capped at AVX2; out_proj,
    narrower than its input, follows the same choice unmeasured). oneDNN is chosen
    for a product when its median is at least 5% lower (the BLAS is torch's default)."""
    g = torch.Generator().manual_seed(0)
    x, w, gy = (torch.randn(*s, generator=g) for s in ((1024, 192), (768, 192), (1024, 768)))
    ms = _median_ms({"blas": lambda: F.linear(x, w), "onednn": lambda: _dnn(x, w, None),
                     "blas_weight_grad": lambda: gy.t().mm(x), "onednn_weight_grad": lambda: _dnn_weight_grad(gy, x)},
                    rounds)
    pick = {k: "onednn" if ms[f"onednn{k}"] < 0.95 * ms[f"blas{k}"] else "blas" for k in ("", "_weight_grad")}
    return {"backend": pick[""], "weight_grad": pick["_weight_grad"], "ms": {k: round(v, 4) for k, v in ms.items()},
            "cpu": config.cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _is_gemm_record(rec: dict[str, Any]) -> bool:
    return {rec.get("backend"), rec.get("weight_grad")} <= {"onednn", "blas"}


def _recorded_choice(path: Path) -> Choice:
    """The choice recorded at ``path``, measured and recorded first when there is none."""
    rec = read_choice(path, _is_gemm_record)
    if rec is None:
        rec = measure_gemm()
        try:
            write_choice(path, rec)
        except OSError:  # a read-only cache: the measurement still holds for this process
            pass
    return Choice(rec["backend"], rec["weight_grad"])


@lru_cache(maxsize=None)
def _choice(setting: config.Gemm, threads: int, caps: tuple[str, ...]) -> Choice:
    del threads, caps  # the cache key: gemm_choice_path() reads them again
    if setting == "blas":
        return Choice("blas", "blas")
    if _onednn_linear() is None:
        if setting == "onednn":
            raise config.KernelConfigError(f"{config.GEMM_ENV}=onednn, but this torch has no oneDNN linear")
        return Choice("blas", "blas")
    return Choice("onednn", "onednn") if setting == "onednn" else _recorded_choice(gemm_choice_path())


def gemm_choice() -> Choice:
    """Which library runs each of :func:`linear`'s products here (SHUFFLEMAMBA_CPU_GEMM; auto: the recorded
    measurement).

    Raises:
        KernelConfigError: a bad SHUFFLEMAMBA_CPU_GEMM, or ``onednn`` where torch has no oneDNN.
    """
    return _choice(config.gemm(), torch.get_num_threads(), tuple(os.environ.get(v, "") for v in _LIB_CAPS))


def gemm_backend() -> Backend:
    """The library of :func:`linear`'s forward (and input gradient): see :func:`gemm_choice`."""
    return gemm_choice().forward


def describe_gemm() -> str:
    """One line for reports: what runs the Vim mixer's linears here, and why."""
    setting, choice = config.gemm(), gemm_choice()
    name = {"onednn": "oneDNN", "blas": "torch's BLAS"}
    what = f"Vim mixer's linears: {name[choice.forward]}"
    if choice.forward == "onednn":
        what += f", weight gradients on {name[choice.weight_grad]}"
    if setting != "auto":
        return f"{what} ({config.GEMM_ENV}={setting})"
    if _onednn_linear() is None:
        return f"{what} (this torch has no oneDNN linear)"
    try:
        ms = (read_choice(gemm_choice_path(), _is_gemm_record) or {})["ms"]
        why = (f"measured: oneDNN {ms['onednn']:.2f} ms, BLAS {ms['blas']:.2f} ms; weight gradient "
               f"{ms['onednn_weight_grad']:.2f} ms, {ms['blas_weight_grad']:.2f} ms")
    except (KeyError, TypeError, ValueError):  # a record without its times
        why = "measured"
    return f"{what} ({why})"


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b on 2-D x, the forward and dx through oneDNN, dW through what :func:`gemm_choice` says."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors
        gy = gy.contiguous()
        # the dense weight's transposed view, passed without a copy: 0.95 ms, 1.07 with one (in_proj at 1576
        # tokens, the Zen 5 with AVX-512)
        gx = _dnn(gy, weight.t(), None) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = _dnn_weight_grad(gy, x) if gemm_choice().weight_grad == "onednn" else gy.t().mm(x)
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for float32 CPU tensors where :func:`gemm_backend`
    picks it; every other case (dtype, device, autocast, traced code, the BLAS picked) is ``F.linear`` itself."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
            or (bias is not None and bias.dtype != torch.float32) or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or gemm_backend() != "onednn"):
        return F.linear(x, weight, bias)
    # a strided bias view gave wrong products: dense operands here (the backward's transposed views of dense
    # tensors, which oneDNN reads right, are its own)
    x2, weight = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if records_grad(x, weight, bias):
        y = _OneDNNLinear.apply(x2, weight, bias)
    else:
        y = _dnn(x2, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters, state dict, hooks and init) whose forward is :func:`linear`."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def convert_linears(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every plain ``nn.Linear`` made a :class:`Linear` (in place; parameters untouched): any
    timm model on the Vim mixer's GEMM, as the benchmarks run timm's ViT and DeiT for a like-for-like figure."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
    return model


def onednn_runs(device: torch.device) -> bool:
    """Whether :class:`Linear` runs on oneDNN (not torch's default GEMM) on ``device`` here."""
    return device.type == "cpu" and gemm_backend() == "onednn"
