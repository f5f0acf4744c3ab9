"""The CPU kernels as PyTorch custom operators: schemas, fake implementations and registered autograd
(torch.library.opcheck), a Vim under torch.compile with no graph break and under torch.export, and
FLOP counts that include the mixer core and the scans."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shufflemamba  # noqa: F401  (before timm / torchvision)
from shufflemamba.models.vim import VisionMamba
from shufflemamba.ops import cpu_mixer, cpu_scan, selective_scan

pytestmark = pytest.mark.skipif(not cpu_scan.cpu_scan_available(), reason="compiled CPU kernels unavailable")
ops = torch.ops.shufflemamba


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scan_cl_args(dtype=torch.float64, batch=2, L=5, E=6, N=3, grad=True):
    g = _g(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    A = (-torch.rand(E, N, generator=g, dtype=dtype) - 0.1).requires_grad_(grad)
    return [r(batch, L, E), r(batch, L, E), A, r(batch, L, N), r(batch, L, N), r(E), r(batch, L, E), r(E)]


def _core_args(dtype=torch.float64, batch=2, L=5, E=6, N=3, R=2, K=4, bias=True):
    g = _g(2)
    r = lambda *s: (0.5 * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_()  # noqa: E731
    xz = r(batch, L, 2 * E)
    params = []
    for _ in range(2):
        A_log = torch.log(torch.rand(E, N, generator=g, dtype=dtype) + 0.2).requires_grad_()
        params += [r(E, 1, K), r(E) if bias else None, r(R + 2 * N, E), r(E, R), r(E), A_log, r(E)]
    return xz, R, params


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_mixer_core_operator_passes_opcheck(bias):
    xz, R, params = _core_args(bias=bias)
    torch.library.opcheck(ops.bimamba_core.default, (xz, R, *params, True))
    torch.library.opcheck(ops.bimamba_core.default, (xz.detach(), R, *[p if p is None else p.detach() for p in params],
                                                     False))


def test_rms_norm_operators_pass_opcheck():
    g = _g(3)
    x, res = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (torch.rand(8, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-5, True))
    torch.library.opcheck(ops.add_rms_norm.default, (x, res, w, 1e-5, True))


def _outputs_and_grads(fn, inputs):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None], allow_unused=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_eager_calls_run_the_operators_registered_backward(bias):
    """The public functions' eager autograd.Function (cpu_mixer._eager_autograd) against the operators
    called directly (torch's wrapper of the registered backward): the same outputs and gradients, bit
    for bit, and the eager path is the one taken."""
    xz, R, params = _core_args(bias=bias)
    fwd, bwd = cpu_mixer.DirectionParams(*params[:7]), cpu_mixer.DirectionParams(*params[7:])
    assert type(cpu_mixer.bimamba_core_cl(xz, R, fwd, bwd).grad_fn).__name__.startswith("bimamba_core_eager")
    got = _outputs_and_grads(lambda: cpu_mixer.bimamba_core_cl(xz, R, fwd, bwd), [xz, *params])
    want = _outputs_and_grads(lambda: ops.bimamba_core(xz, R, *params, True)[0], [xz, *params])

    g = _g(7)
    x, res = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (torch.rand(8, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    for a, b in ((lambda: cpu_mixer.rms_norm_cpu(x, w, 1e-5), lambda: ops.rms_norm(x, w, 1e-5, True)[0]),
                 (lambda: cpu_mixer.add_rms_norm_cpu(x, res, w, 1e-5),
                  lambda: ops.add_rms_norm(x, res, w, 1e-5, True)[:2])):
        got += _outputs_and_grads(a, [x, res, w])
        want += _outputs_and_grads(b, [x, res, w])
    for a, b in zip(got, want):
        for ta, tb in zip(a, b, strict=True):
            assert (ta is None and tb is None) or torch.equal(ta, tb)


@pytest.mark.parametrize("optional", [True, False], ids=["D-z-bias", "bare"])
def test_scan_and_conv_operators_pass_opcheck(optional):
    u, delta, A, B, C, D, z, bias = _scan_cl_args()
    if not optional:
        D = z = bias = None
    torch.library.opcheck(ops.selective_scan_cl.default, (u, delta, A, B, C, D, z, bias, True, True, 0.5, True))
    t = lambda x: x.transpose(1, 2).detach().contiguous().requires_grad_()  # noqa: E731  (batch, E, L)
    torch.library.opcheck(ops.selective_scan_cpu.default,
                          (t(u), t(delta), A, t(B), t(C), D, None if z is None else t(z), bias, True))
    w = torch.randn(u.shape[-1], 1, 4, generator=_g(4), dtype=u.dtype, requires_grad=True)
    torch.library.opcheck(ops.conv1d_silu_cl.default, (u, w, D, True))


def test_compiled_dispatcher_scan_matches_eager():
    """selective_scan(impl="cpu", reverse=True) (the flips around the (batch, E, L) operator) in one
    graph, its output and gradients as in eager mode."""
    u, delta, A, B, C, D, z, bias = _scan_cl_args()
    args = [t.transpose(1, 2).detach().contiguous().requires_grad_() if t.dim() == 3 else t for t in
            (u, delta, A, B, C, D, z, bias)]

    def f(*a):
        return selective_scan(*a, delta_softplus=True, impl="cpu", reverse=True)

    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        out = fn(*args)
        results.append([out.detach(), *torch.autograd.grad(out.square().sum(), args)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _small_vim() -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(img_size=32, patch_size=8, embed_dim=48, depth=2, d_state=8, num_classes=10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_vim_traces_into_one_graph(train):
    """The mixer core, the norms and the kernels' availability check are one graph for Dynamo: no
    ctypes call or torch.get_num_threads() in traced code."""
    model = _small_vim().train(train)
    explain = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    assert explain.graph_count == 1


def _compiled_matches_eager(backend: str) -> None:
    model = _small_vim()
    x = torch.randn(2, 3, 32, 32, generator=_g(5))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, model):
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        results.append([out.detach(), *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compiled_vim_matches_eager_aot_autograd():
    """torch.compile(fullgraph=True) through AOTAutograd (the operators' fake implementations and
    registered backward in the traced joint graph): outputs and every gradient as in eager mode."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compiled_vim_matches_eager_inductor():
    _compiled_matches_eager("inductor")


def test_export_captures_vim_with_the_operators():
    model = _small_vim().eval()
    x = torch.randn(2, 3, 32, 32, generator=_g(6))
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"shufflemamba.bimamba_core.default", "shufflemamba.add_rms_norm.default"} <= targets, targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=0, rtol=0)


def test_flop_counter_sees_the_scan_and_the_mixer_core():
    batch, L, E, N = 2, 5, 6, 3
    args = _scan_cl_args(dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = cpu_scan.selective_scan_cl(*args, delta_softplus=True)
        out.sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    forward = 9 * batch * L * E * N + 2 * batch * L * E  # mamba_ssm's count: states, D, gate
    assert counts["shufflemamba.selective_scan_cl"] == forward
    assert counts["shufflemamba.selective_scan_cl_backward"] == 2 * forward

    xz, R, params = _core_args(dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        y = cpu_mixer.bimamba_core_cl(xz, R, cpu_mixer.DirectionParams(*params[:7]),
                                      cpu_mixer.DirectionParams(*params[7:]))
        y.sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    per_direction = 2 * batch * L * E * (4 + R + 2 * N + R) + forward  # conv, x_proj, dt_proj, scan
    assert counts["shufflemamba.bimamba_core"] == 2 * per_direction
    assert counts["shufflemamba.bimamba_core_backward"] == 4 * per_direction

    t = lambda x: x.detach().transpose(1, 2).contiguous()  # noqa: E731  (batch, E, L)
    with FlopCounterMode(display=False) as counter:
        selective_scan(t(args[0]), t(args[1]), args[2].detach(), t(args[3]), t(args[4]), impl="cpu")
    assert counter.get_flop_counts()["Global"][ops.selective_scan_cpu] == 9 * batch * L * E * N  # no D, no gate

    with FlopCounterMode(display=False) as counter:
        _small_vim().eval()(torch.randn(1, 3, 32, 32))
    assert counter.get_flop_counts()["Global"][ops.bimamba_core] > 0


def test_cpu_scan_command_prints_the_width(capsys):
    assert cpu_scan.main([]) == 0
    assert capsys.readouterr().out.startswith("cpu kernels: ")
