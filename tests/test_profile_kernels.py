"""benchmarks/profile_train_step.py: another revision's CPU kernels swapped in per step (--kernels-from), and --inference."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("profile_train_step", ROOT / "benchmarks" / "profile_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _needs_checkout_and_kernels():
    from shufflemamba.ops import cpu_scan

    if not cpu_scan.cpu_scan_available():
        pytest.skip("compiled CPU kernels unavailable")
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")


def test_kernels_from_head_run_and_the_current_library_is_restored():
    _needs_checkout_and_kernels()
    from shufflemamba.ops import cpu_library

    mod = _module()
    current = cpu_library.library()
    res = mod.compare_kernels("demo16", "HEAD", steps=1, warmup=0)
    assert cpu_library._lib is current  # the A/B must not leave the other revision's library loaded
    assert set(res["median"]) == {"HEAD", "current"} and all(v > 0 for v in res["median"].values())
    assert res["speedup_paired"] > 0


def test_kernels_from_an_unknown_revision_is_one_error_line():
    _needs_checkout_and_kernels()
    with pytest.raises(SystemExit, match="error: git"):
        _module().kernels_at("no-such-revision-xyz")


def test_kernels_flags_core_ab_times_forward_and_backward_apart():
    """--kernels-flags --core: the working tree's kernels built with a define against the loaded ones,
    the first mixer core's forward and backward timed apart, and the loaded library restored."""
    _needs_checkout_and_kernels()
    from shufflemamba.ops import cpu_library

    mod = _module()
    current = cpu_library.library()
    res = mod.compare_kernels("demo16", None, steps=1, warmup=0, extra_flags=("-DCL_PF=2",), core=True)
    assert cpu_library._lib is current
    assert set(res) == {"forward", "backward"}
    for part in res.values():
        assert set(part["median"]) == {"working tree -DCL_PF=2", "current"}
        assert all(v > 0 for v in part["median"].values()) and part["speedup_paired"] > 0


def test_kernels_flags_that_do_not_compile_are_one_error_line():
    _needs_checkout_and_kernels()
    with pytest.raises(SystemExit, match="error: building the kernels of the working tree"):
        # an option no compiler knows fails the build on every CPU (EB=7 only fails where AVX-512 is)
        _module().kernels_at(None, ("-fshufflemamba-no-such-option",))


def test_inference_profiles_forward_passes_with_the_commands_malloc_setting(monkeypatch, capsys):
    """--inference: forward passes in inference mode (no autograd graph, the model in eval mode), with the
    malloc setting the paper's pair times under; it does not combine with the A/B modes."""
    mod = _module()
    calls = []
    monkeypatch.setattr(mod, "tune_malloc", lambda: calls.append("malloc") or True)
    step = mod.make_step("demo16", inference=True)
    assert isinstance(step(), float)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--inference", "--models", "demo16", "--steps", "1", "--warmup", "0", "--top", "3"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets its --threads
    assert calls == ["malloc"]
    out = capsys.readouterr().out
    assert "== demo16" in out and "ms/step" in out
    assert not any("backward" in line.lower() for line in out.splitlines())  # no autograd ops profiled
    with pytest.raises(SystemExit) as exc:
        mod.main(["--inference", "--compare"])
    assert exc.value.code == 2
