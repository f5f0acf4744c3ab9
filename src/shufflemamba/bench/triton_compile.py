"""Compile the Triton scan kernels for a GPU architecture on a machine without one.

Triton's compiler does not need a device: given a target (``sm_90`` is the H100) it lowers a kernel
through its IRs to PTX and, with the ``ptxas`` that ships in the triton wheel, to a cubin. That
checks what the CPU interpreter cannot (that the kernels compile at all, with the specialisation a
real launch would get) and shows what the hardware would run: registers per thread, spills to local
memory, and the SASS instruction mix. Speed still needs a GPU.

Triton chooses between compiler and interpreter when it is first imported, so this only works in a
process where ``TRITON_INTERPRET`` was not set (``python -m shufflemamba.bench.triton_compile``).

This reaches into triton's launcher (``create_function_from_signature``, ``JITFunction._pack_args``)
to specialise arguments exactly as ``kernel[grid](...)`` would: pointer alignment, strides equal to
1 turned into constants, integers divisible by 16. Those are private APIs; a triton that changes them
makes this raise, and nothing else in the package depends on it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..ops import triton_kernels as tk
from ..ops import triton_scan as ts

# The most SASS instructions per element-step (loop body / elements per thread) a shipped variant may
# compile to: what the pinned Triton and Triton 3.6 both reach today with a few to spare, so a change
# to the kernels (or a Triton release) that makes them instruction-bound again fails the compile test
LIMITS = {"fwd": 30.0, "bwd": 95.0}
# the mixer shapes the model zoo ships at batch 32: (batch, E, L, N) of Vim-Ti, Vim-S and Vim-B
MIXER_SHAPES = {"vim_ti": (32, 384, 197, 16), "vim_s": (32, 768, 197, 16), "vim_b": (32, 1536, 197, 16)}

# SASS opcodes worth counting: the exp2 unit, global loads / stores, warp shuffles (the parallel
# scan and the reductions), local-memory traffic (spills)
_OPS_OF_INTEREST = ("MUFU", "LDG", "STG", "SHFL", "LDL", "STL", "FFMA", "FMUL", "FADD", "BAR", "LDS", "STS")


@dataclass
class KernelReport:
    """What ptxas made of one kernel: resources per thread and a static SASS instruction count."""

    kernel: str
    arch: str
    shape: tuple[int, int, int, int]  # (batch, E, L, N)
    dtype: str
    reverse: bool
    block_e: int
    block_t: int
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int  # > 0 means spills to local memory
    shared_bytes: int
    sass_instructions: int
    loop_instructions: int  # the chunk loop's body: what runs once per BLOCK_T steps
    instructions_per_element: float  # loop body / (e, n, t) elements each thread handles per iteration
    sass_ops: dict[str, int] = field(default_factory=dict)  # whole kernel
    loop_ops: dict[str, int] = field(default_factory=dict)  # the chunk loop's body only
    triton: str = ""  # the compiler's version: the same kernels compile very differently across releases


def _tools_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _example_inputs(batch: int, E: int, L: int, N: int, dtype: torch.dtype) -> dict:
    """Empty CPU tensors with the strides :class:`~shufflemamba.models.BiMambaMixer`'s (B, E, L) path
    really passes (the CUDA path), so the compiler specialises as on a real launch:

    * u: the conv + SiLU output, a contiguous (batch, E, L) tensor;
    * z: the second half of ``in_proj``'s (batch, L, 2E) output seen as (batch, E, L): contiguous
      along channels (stride 1 on E, 2E on L);
    * delta: ``dt_proj``'s (batch, L, E) output transposed: contiguous along channels;
    * B, C: column slices of ``x_proj``'s (batch, L, dt_rank + 2N) output, transposed to (batch, N, L);
    * A, D, delta_bias: float32 parameters (they stay float32 under autocast).

    dt_rank is Vim's ceil(D / 16) with D = E / 2.
    """
    dt_rank = math.ceil(E / 2 / 16)
    xz = torch.empty(batch, L, 2 * E, dtype=dtype)  # in_proj output
    x_dbl = torch.empty(batch, L, dt_rank + 2 * N, dtype=dtype)  # x_proj output
    return dict(
        u=torch.empty(batch, E, L, dtype=dtype),
        delta=torch.empty(batch, L, E, dtype=dtype).transpose(1, 2),
        A=torch.empty(E, N),
        B=x_dbl[..., dt_rank:dt_rank + N].transpose(1, 2),
        C=x_dbl[..., dt_rank + N:].transpose(1, 2),
        D=torch.empty(E),
        z=xz[..., E:].transpose(1, 2),
        delta_bias=torch.empty(E),
    )


def _compile(launch, arch: int):
    """Compile ``launch``'s kernel as ``kernel[grid](*args, **meta)`` would specialise it, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if tk.interpreter_mode():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: run this in a fresh process without it")
    fn = tk.kernel(launch.name)
    assert isinstance(fn, JITFunction)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(_tools_dir() / "cuobjdump"), "--dump-resource-usage", f.name],
                               check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([str(_tools_dir() / "cuobjdump"), "-sass", f.name],
                              check=True, capture_output=True, text=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    # SASS lines look like "/*0070*/  @P0 MUFU.EX2 R5, R4 ;" (the predicate is optional)
    lines = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    opcodes = [(a, m.group(1)) for a, text in lines
               if (m := re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text))]
    # a loop is a branch back to a lower address; the chunk loop is the kernels' only (outermost) one
    loops = [(int(target, 16), addr)
             for addr, text in lines for target in re.findall(r"\bBRA\b[^0-9]*0x([0-9a-f]+)", text)
             if int(target, 16) < addr]
    start, end = max(loops, key=lambda se: se[1] - se[0], default=(1, 0))
    counts = Counter(op for _, op in opcodes)
    loop_counts = Counter(op for a, op in opcodes if start <= a <= end)
    return dict(registers=fields.get("REG", -1), stack_bytes=fields.get("STACK", 0),
                local_bytes=fields.get("LOCAL", 0), shared_bytes=fields.get("SHARED", 0),
                sass_instructions=len(opcodes), loop_instructions=sum(loop_counts.values()),
                sass_ops={op: counts[op] for op in _OPS_OF_INTEREST if counts[op]},
                loop_ops={op: loop_counts[op] for op in _OPS_OF_INTEREST if loop_counts[op]})


def compile_report(batch: int = 32, E: int = 384, L: int = 197, N: int = 16,
                   dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                   reverse: bool = False, tiles: tuple[int, int, int] | None = None) -> list[KernelReport]:
    """Compile the forward and backward kernels for (batch, E, L, N) inputs and report on each.

    Defaults: a Vim-Ti mixer at batch 32 in bf16, for the H100 (sm_90), with the tile sizes a real
    launch would use; ``tiles=(block_e, block_t, num_warps)`` tries others (the sweep behind
    :func:`~shufflemamba.ops.triton_scan.launch_config`'s choice).
    """
    if not tk.HAS_TRITON:
        raise ImportError("compile_report needs triton: pip install 'shufflemamba[triton]'")
    x = _example_inputs(batch, E, L, N, dtype)
    cfg = ts.LaunchConfig(*tiles) if tiles else ts.launch_config(E, batch, N, interpret=False)
    nchunk = tk.triton.cdiv(L, cfg.block_t)
    ckpt = torch.empty(batch, nchunk, E, N)
    gout = torch.empty(batch, E, L, dtype=dtype)
    launches = [
        ts.fwd_launch(*x.values(), True, reverse, True, interpret=False, cfg=cfg),
        ts.bwd_launch(*x.values(), True, reverse, ckpt, gout, interpret=False, cfg=cfg),
    ]
    reports = []
    for launch in launches:
        compiled = _compile(launch, arch)
        res = _resources(compiled.asm["cubin"])
        per_thread = cfg.block_t * cfg.block_e * launch.meta["BLOCK_N"] / (32 * cfg.num_warps)
        reports.append(KernelReport(
            kernel=launch.name, arch=f"sm_{arch}", shape=(batch, E, L, N), dtype=str(dtype).split(".")[-1],
            reverse=reverse, block_e=cfg.block_e, block_t=cfg.block_t, num_warps=cfg.num_warps,
            instructions_per_element=round(res["loop_instructions"] / per_thread, 1), **res,
            triton=tk.triton.__version__,
        ))
    return reports


def shipped_variants(shapes: list[tuple[int, int, int, int]] | None = None,
                     dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                     directions: tuple[bool, ...] = (False, True)) -> list[dict]:
    """``compile_report`` keyword sets for every kernel variant the mixer launches: each shape (default
    Vim-Ti and Vim-B) x activation dtype x scan direction (forward and backward kernels come in each)."""
    shapes = shapes or [MIXER_SHAPES["vim_ti"], MIXER_SHAPES["vim_b"]]
    return [dict(batch=b, E=E, L=L, N=N, dtype=getattr(torch, d), reverse=r)
            for (b, E, L, N) in shapes for d in dtypes for r in directions]


def over_limits(reports: list[KernelReport]) -> list[str]:
    """What breaks :data:`LIMITS` or spills, one line per offending kernel ([] when all is well)."""
    bad = []
    for r in reports:
        what = (f"{r.kernel} {r.dtype} {'reverse' if r.reverse else 'forward'} shape={tuple(r.shape)} "
                f"(triton {r.triton})")
        if r.instructions_per_element > LIMITS[r.kernel]:
            bad.append(f"{what}: {r.instructions_per_element} SASS instructions per element-step > {LIMITS[r.kernel]}")
        if r.local_bytes or r.stack_bytes:
            bad.append(f"{what}: spills ({r.local_bytes} B local, {r.stack_bytes} B stack per thread)")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shufflemamba.bench.triton_compile",
        description="Compile the Triton scan kernels for a GPU architecture (no GPU needed) and report "
                    "registers, spills and the SASS instruction mix. Default: every variant the mixer "
                    "launches (Vim-Ti and Vim-B at batch 32, fp32 and bf16, both scan directions).")
    parser.add_argument("--shape", type=int, nargs=4, action="append", metavar=("BATCH", "E", "L", "N"),
                        help="repeatable; default: the Vim-Ti and Vim-B mixers at batch 32")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), action="append",
                        help="repeatable; default: float32 and bfloat16")
    parser.add_argument("--direction", choices=("forward", "reverse", "both"), default="both",
                        help="scan direction(s): the mixer runs both")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    parser.add_argument("--tiles", type=int, nargs=3, metavar=("BLOCK_E", "BLOCK_T", "WARPS"),
                        help="tile sizes to try instead of launch_config's (powers of two)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a kernel spills or exceeds {LIMITS['fwd']:g} (forward) / "
                             f"{LIMITS['bwd']:g} (backward) SASS instructions per element-step")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else None
    if shapes and any(v <= 0 for shape in shapes for v in shape):
        print("error: --shape values must be positive", file=sys.stderr)
        return 2
    if args.tiles and any(v <= 0 or v & (v - 1) for v in args.tiles):
        print(f"error: --tiles values must be powers of two, got {args.tiles}", file=sys.stderr)
        return 2
    directions = {"forward": (False,), "reverse": (True,), "both": (False, True)}[args.direction]
    variants = shipped_variants(shapes, tuple(args.dtype or ("float32", "bfloat16")), directions)
    try:
        reports = [r for v in variants
                   for r in compile_report(**v, arch=args.arch, tiles=tuple(args.tiles or ()) or None)]
    except (ImportError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in reports:
        ops = " ".join(f"{k}={v}" for k, v in r.loop_ops.items())
        print(f"{r.kernel}: triton {r.triton} {r.arch} {r.dtype} {'reverse' if r.reverse else 'forward'} "
              f"shape={r.shape} block_e={r.block_e} block_t={r.block_t} "
              f"warps={r.num_warps} | regs={r.registers} local={r.local_bytes}B stack={r.stack_bytes}B "
              f"shared={r.shared_bytes}B | loop body {r.loop_instructions} SASS instrs "
              f"({r.instructions_per_element} per element-step) of {r.sass_instructions}; in the loop: {ops}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1) + "\n")
    bad = over_limits(reports)
    for line in bad:
        print(f"over the limit: {line}", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
