"""benchmarks/exp_bound.py: its stand-in exps must still fit the kernel sources, and take effect."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "src" / "shufflemamba" / "ops" / "csrc" / "pointwise_x86.h"


@pytest.fixture
def exp_bound(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: it imports profile_train_step
    spec = importlib.util.spec_from_file_location("exp_bound", ROOT / "benchmarks" / "exp_bound.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("profile_train_step", None)


def test_stand_ins_replace_both_exps_and_keep_the_originals(exp_bound):
    text = HEADER.read_text()
    edited = exp_bound.editor(exp_bound.DECAY, exp_bound.ROWS_EXP)(HEADER.name, text)
    assert "sm_vexp2_unused" in edited and "sm_vexp_m_unused" in edited
    assert edited.count("sm_vset1(0.01f)") == 2
    assert exp_bound.editor(exp_bound.DECAY)("mixer_cl.c", "unchanged") == "unchanged"  # other files as they are


def test_a_stand_in_that_no_longer_matches_is_one_error_line(exp_bound):
    with pytest.raises(SystemExit, match="error: pointwise_x86.h has no line matching"):
        exp_bound.editor(("static inline sm_vf no_such_function\\(", "x"))(HEADER.name, HEADER.read_text())


def test_the_decay_stand_in_takes_effect_and_the_library_is_restored(exp_bound):
    from shufflemamba.ops import cpu_library, cpu_scan

    if not cpu_scan.cpu_scan_available() or not cpu_library.state_loop_bits(cpu_library.library()):
        pytest.skip("needs the compiled kernels' explicit x86 state loops")
    g = torch.Generator().manual_seed(0)
    batch, L, E, N = 2, 9, 96, 4
    u, delta = torch.randn(batch, L, E, generator=g), torch.rand(batch, L, E, generator=g)
    A = -torch.rand(E, N, generator=g) - 0.5
    B, C = torch.randn(batch, L, N, generator=g), torch.randn(batch, L, N, generator=g)
    current = cpu_library.library()
    real = cpu_scan.selective_scan_cl(u, delta, A, B, C)
    previous = cpu_library.swap_library(exp_bound.kernels_at(None, edit=exp_bound.editor(exp_bound.DECAY)))
    try:
        stand_in = cpu_scan.selective_scan_cl(u, delta, A, B, C)
    finally:
        cpu_library.swap_library(previous)
    assert cpu_library.library() is current
    assert (stand_in - real).abs().max() > 1e-3  # decays of 1 + t / 100 instead of 2^t
    torch.testing.assert_close(cpu_scan.selective_scan_cl(u, delta, A, B, C), real, rtol=0, atol=0)
