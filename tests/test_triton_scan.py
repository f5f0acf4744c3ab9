"""Triton selective scan vs the PyTorch reference: forward and every gradient.

Without a GPU these run through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported) on tiny shapes; the ``gpu`` tests repeat the check on Vim-S shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import shufflemamba  # noqa: E402,F401  (before anything that imports torchvision)
from shufflemamba.ops.selective_scan import selective_scan_ref  # noqa: E402
from shufflemamba.ops.triton_scan import (  # noqa: E402
    interpreter_mode,
    selective_scan_triton,
    triton_available,
)

CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not interpreter_mode(),
    reason="triton was imported without TRITON_INTERPRET=1, so its CPU interpreter is off",
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, E, L, N, *, has_D=True, has_z=True, has_bias=True, softplus=True, seed=0,
                device="cpu"):
    """Inputs shaped and scaled like a Vim mixer's (dt in ~[1e-3, 1e-1], A = -(1..N))."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = rnd(batch, E, L)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1) * (1 + 0.1 * rnd(E, N)).abs()
    B, C = rnd(batch, N, L), rnd(batch, N, L)
    if softplus:
        delta = 0.5 * rnd(batch, E, L)
        dt = torch.exp(torch.rand(E, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as in Vim's dt_proj init
        if not has_bias:
            delta = delta + bias[:, None]
    else:  # no softplus: delta must already be a positive step
        delta = 0.01 + 0.1 * torch.rand(batch, E, L, generator=g)
        bias = 0.01 * torch.rand(E, generator=g)
    D = rnd(E) if has_D else None
    z = rnd(batch, E, L) if has_z else None
    out = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias if has_bias else None)
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


def run(fn, inputs, softplus, gout, dtype=None):
    """Output and gradients of ``fn``; ``dtype`` casts u, delta, B, C, z (the activations)."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            leaves[k] = None
            continue
        v = v.detach().clone()
        if dtype is not None and k in ("u", "delta", "B", "C", "z"):
            v = v.to(dtype)
        leaves[k] = v.requires_grad_()
    out = fn(**leaves, delta_softplus=softplus)
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in present], gout.to(out.device, out.dtype))
    return out, dict(zip(present, grads))


def assert_close_scaled(actual, expected, rtol, name):
    """assert_close with atol relative to the tensor's scale (gradients span orders of magnitude)."""
    expected = expected.float()
    atol = rtol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def check_against_reference(inputs, softplus, rtol, dtype=None):
    ref_out, ref_grads = run(selective_scan_ref, inputs, softplus, GOUT[inputs["u"].shape])
    out, grads = run(selective_scan_triton, inputs, softplus, GOUT[inputs["u"].shape], dtype)
    assert out.dtype == (dtype or torch.float32)
    assert out.shape == ref_out.shape
    assert_close_scaled(out, ref_out, rtol, "out")
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert grads[k].shape == ref_grads[k].shape, k
        assert grads[k].dtype == (dtype if dtype is not None and k in ("u", "delta", "B", "C", "z")
                                  else torch.float32), k
        assert_close_scaled(grads[k], ref_grads[k], rtol, f"grad {k}")


class _Gout(dict):
    """A fixed upstream gradient per output shape, so reference and kernel see the same one."""

    def __missing__(self, shape):
        self[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(123))
        return self[shape]


GOUT = _Gout()


def test_triton_available_is_bool():
    assert isinstance(triton_available(), bool)
    assert triton_available("cpu") == interpreter_mode()


@needs_interpreter
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 5, 4), (2, 16, 33, 16), (1, 12, 17, 6), (2, 80, 9, 4)],
    ids=["tiny", "3chunks", "nonpow2", "2eblocks"],
)
def test_fp32_full(shape):
    """All options on: softplus, bias, D, z. Covers chunk tails, E and N masking, several E blocks."""
    check_against_reference(make_inputs(*shape), softplus=True, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(
    "has_D,has_z,has_bias,softplus",
    [(False, False, False, False), (True, False, True, False), (False, True, False, True),
     (True, True, False, True)],
)
def test_fp32_options(has_D, has_z, has_bias, softplus):
    inputs = make_inputs(2, 8, 19, 8, has_D=has_D, has_z=has_z, has_bias=has_bias, softplus=softplus)
    check_against_reference(inputs, softplus=softplus, rtol=1e-4)


@needs_interpreter
def test_softplus_linear_region():
    """delta + bias above 20, where softplus is the identity (torch's threshold)."""
    inputs = make_inputs(1, 8, 7, 4, seed=3)
    inputs["delta"][:, :3, 2:4] = 25.0
    check_against_reference(inputs, softplus=True, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """Half-precision activations, fp32 state: compared with the fp32 reference, loosely."""
    inputs = make_inputs(2, 16, 20, 8, seed=1)
    # round the inputs to the low precision first, so only the kernel's arithmetic differs
    inputs = {k: (v.to(dtype).float() if v is not None and k in ("u", "delta", "B", "C", "z") else v)
              for k, v in inputs.items()}
    check_against_reference(inputs, softplus=True, rtol=3e-2, dtype=dtype)


@needs_interpreter
def test_non_contiguous_inputs():
    """Flipped u/z (the backward direction) and B/C sliced out of one projection, as in the mixer."""
    batch, E, L, N = 2, 8, 12, 4
    inputs = make_inputs(batch, E, L, N, seed=2)
    x_dbl = torch.randn(batch, L, 3 + 2 * N)  # like x_proj's output: (batch, L, dt_rank + 2N)
    inputs["B"] = x_dbl[..., 3:3 + N].transpose(1, 2)
    inputs["C"] = x_dbl[..., 3 + N:].transpose(1, 2)
    inputs["u"] = inputs["u"].flip(-1)
    inputs["z"] = torch.randn(batch, L, E).transpose(1, 2)
    assert not inputs["B"].is_contiguous() and not inputs["z"].is_contiguous()
    check_against_reference(inputs, softplus=True, rtol=1e-4)


@needs_interpreter
def test_no_grad_matches():
    inputs = make_inputs(2, 8, 10, 4)
    with torch.no_grad():
        out = selective_scan_triton(**inputs, delta_softplus=True)
        ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert_close_scaled(out, ref, 1e-4, "out")


@needs_interpreter
def test_bad_shapes_raise():
    inputs = make_inputs(2, 8, 10, 4)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_triton(**{**inputs, "B": inputs["B"][:, :, :5]})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_triton(**{**inputs, "A": inputs["A"][:4]})
    with pytest.raises(TypeError, match="dtype"):
        selective_scan_triton(**{**inputs, "u": inputs["u"].double()})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_gpu_vim_s_shapes(dtype, rtol):
    """Vim-S mixer shapes (E 768, L 197, N 16) on a GPU, forward and backward vs the reference
    (dB and dC summed by atomics across the 96 channel blocks)."""
    inputs = make_inputs(8, 768, 197, 16, device="cuda")
    half = dtype is not torch.float32
    if half:
        inputs = {k: (v.to(dtype).float() if v is not None and k in ("u", "delta", "B", "C", "z") else v)
                  for k, v in inputs.items()}
    check_against_reference(inputs, softplus=True, rtol=rtol, dtype=dtype if half else None)


@needs_interpreter
@pytest.mark.parametrize("shape", [(2, 8, 5, 4), (1, 12, 37, 6)], ids=["tiny", "3chunks"])
def test_reverse_equals_flipped_scan(shape):
    """reverse=True reads the sequence backwards: the same as flip -> scan -> flip, gradients included."""
    inputs = make_inputs(*shape, seed=4)
    timed = ("u", "delta", "B", "C", "z")

    def flipped_ref(**kw):
        kw = {k: (v.flip(-1) if k in timed and v is not None else v) for k, v in kw.items()}
        return selective_scan_ref(**kw).flip(-1)

    def reversed_triton(**kw):
        return selective_scan_triton(**kw, reverse=True)

    ref_out, ref_grads = run(flipped_ref, inputs, True, GOUT[inputs["u"].shape])
    out, grads = run(reversed_triton, inputs, True, GOUT[inputs["u"].shape])
    assert_close_scaled(out, ref_out, 1e-4, "out")
    for k in ref_grads:
        assert_close_scaled(grads[k], ref_grads[k], 1e-4, f"grad {k}")


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dBC", "deterministic"])
def test_gpu_launch_config_under_interpreter(monkeypatch, deterministic):
    """The tile sizes a GPU launch uses (narrow E blocks, short chunks), checked for correctness here:
    E spans several blocks (dB, dC summed over them by atomics, or by slices when PyTorch asks for
    deterministic algorithms), L several chunks with a tail, N is not a power of two."""
    from shufflemamba.ops import triton_scan

    gpu_cfg = triton_scan.launch_config(24, 2, 6, interpret=False)
    assert gpu_cfg.block_e < 24 and gpu_cfg.block_t < 37
    monkeypatch.setattr(triton_scan, "launch_config", lambda E, batch, N, interpret: gpu_cfg)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference(make_inputs(2, 24, 37, 6, seed=5), softplus=True, rtol=1e-4)
    finally:
        torch.use_deterministic_algorithms(was)


@needs_interpreter
def test_mixer_with_triton_scan_matches_reference_scan():
    """A whole bidirectional mixer on the Triton scan (both directions, the reverse one read backwards)."""
    from shufflemamba.models import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4, scan_impl="triton")
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    out = mixer(hidden)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, *mixer.parameters()], gout)
    mixer.scan_impl = "ref"
    ref = mixer(hidden)
    ref_grads = torch.autograd.grad(ref, [hidden, *mixer.parameters()], gout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4)


def test_kernels_compile_for_h100(tmp_path):
    """Triton's real compiler (not the interpreter) builds every kernel variant the mixer launches
    (forward and backward kernels, fp32 and bf16, both scan directions, Vim-Ti and Vim-B shapes with
    the mixer's strides) for sm_90 with no GPU present, under whichever Triton is installed: no spill
    to local memory or stack, and at most LIMITS SASS instructions per element-step. Runs in a fresh
    process, since this one imported triton for the interpreter."""
    import json
    import os
    import subprocess
    import sys

    from shufflemamba.bench.triton_compile import LIMITS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "shufflemamba.bench.triton_compile", "--check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    reports = json.loads(out.read_text())
    variants = {(r["kernel"], r["dtype"], r["reverse"], r["shape"][1]) for r in reports}
    assert variants == {(k, d, rev, E) for k in ("fwd", "bwd") for d in ("float32", "bfloat16")
                        for rev in (False, True) for E in (384, 1536)}
    for r in reports:
        assert r["arch"] == "sm_90"
        assert 0 < r["registers"] <= 255
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert 0 < r["instructions_per_element"] <= LIMITS[r["kernel"]], r
        assert r["loop_ops"].get("MUFU", 0) > 0  # the exp2 of the decay made it into the loop's machine code


def test_compile_limits_flag_slow_or_spilling_kernels():
    """The --check verdict: within limits passes; over the limit or spilling is named."""
    from shufflemamba.bench.triton_compile import LIMITS, KernelReport, over_limits

    def report(kernel, per_element, stack=0):
        return KernelReport(kernel=kernel, arch="sm_90", shape=(32, 384, 197, 16), dtype="bfloat16", reverse=True,
                            block_e=8, block_t=16, num_warps=4, registers=200, stack_bytes=stack, local_bytes=0,
                            shared_bytes=0, sass_instructions=1, loop_instructions=1,
                            instructions_per_element=per_element, triton="3.6.0")

    assert over_limits([report("fwd", LIMITS["fwd"]), report("bwd", LIMITS["bwd"])]) == []
    bad = over_limits([report("fwd", 75.5), report("bwd", 90.0, stack=8)])
    assert len(bad) == 2
    assert "fwd bfloat16 reverse" in bad[0] and "75.5" in bad[0] and "3.6.0" in bad[0]
    assert "bwd" in bad[1] and "8 B stack" in bad[1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_reverse_and_deterministic():
    """reverse=True on a GPU equals the flipped scan; deterministic mode gives bit-identical reruns."""
    inputs = make_inputs(4, 384, 197, 16, device="cuda", seed=6)
    with torch.no_grad():
        timed = ("u", "delta", "B", "C", "z")
        flipped = {k: (v.flip(-1) if k in timed and v is not None else v) for k, v in inputs.items()}
        ref = selective_scan_ref(**flipped, delta_softplus=True).flip(-1)
        out = selective_scan_triton(**inputs, delta_softplus=True, reverse=True)
    assert_close_scaled(out, ref, 1e-3, "out")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, g1 = run(selective_scan_triton, inputs, True, GOUT[inputs["u"].shape])
        _, g2 = run(selective_scan_triton, inputs, True, GOUT[inputs["u"].shape])
    finally:
        torch.use_deterministic_algorithms(was)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_kernels_rely_on_no_reduction_order():
    """Triton promises no order for tl.reduce's combines (triton#4962): the kernels pick a tile's first or
    last row with a one-hot sum, never with a reduce whose combine keeps one operand."""
    import ast
    import inspect

    from shufflemamba.ops import triton_kernels

    tree = ast.parse(inspect.getsource(triton_kernels))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "reduce"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"]
    assert calls == [], [ast.unparse(c) for c in calls]
