"""``make gpu-check`` / ``shufflemamba doctor --gpu`` without a GPU: the one-line answer, and the whole
check run on the CPU at tiny sizes (``--device cpu --quick``) so its code paths are exercised here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.bench import gpu_check
from shufflemamba.bench.environment import scan_impls
from shufflemamba.bench.report import gpu_check_markdown
from shufflemamba.bench.short_train import LOSS_AGREEMENT, loss_agreement, short_train
from shufflemamba.cli import main as cli

from test_mamba_ssm_glue import fakes  # noqa: F401  (fixture: stand-in mamba_ssm / causal-conv1d)

REPO = Path(__file__).resolve().parents[1]


def _docs_section():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_section", REPO / "benchmarks" / "docs_section.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")


@no_cuda
def test_no_gpu_prints_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "shufflemamba", "doctor", "--gpu", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA GPU" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@no_cuda
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_prints_one_line():
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA GPU" in proc.stdout, proc.stdout


def test_bad_arguments(capsys):
    assert cli(["doctor", "--gpu", "--device", "tpu"]) == 2
    assert cli(["doctor", "--gpu", "--budget-s", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err


def test_doctor_prints_environment(capsys):
    assert cli(["doctor"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["torch"] == torch.__version__ and "kernels.mamba_ssm" in lines
    assert lines["auto_impl.float32"] in ("cpu", "torch", "triton", "mamba_ssm")


def test_quick_cpu_run_writes_json_and_markdown(tmp_path, fakes):  # noqa: F811
    """Every section on the CPU at tiny sizes, with the mamba_ssm stand-in present: parity of each impl
    within tolerance, timings, training steps and the SLWS section recorded, and (benchmarks/docs_section.py)
    the markdown section written between its markers without touching the rest of the file."""
    md = tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    out = tmp_path / "r.json"
    assert gpu_check.main(["--gpu", "--device", "cpu", "--quick", "--skip", "pytest", "--json", str(out)]) == 0
    assert md.read_text() == "# Benchmarks\n\nhand-written text\n"  # the library writes no docs
    docs = _docs_section()
    assert docs.main(["gpu-check", str(out), "--docs", str(md)]) == 0
    rep = json.loads(out.read_text())
    assert rep["pytest"]["status"] == "skipped"
    for name in ("environment", "parity", "scan_timing", "train_step", "slws", "short_train"):
        assert rep[name].get("status", "ok") == "ok", (name, rep[name])
    assert rep["meta"]["isolated"] is False  # on the CPU the sections run in-process (the stand-ins live here)
    for name in gpu_check.SECTIONS[2:]:  # every box ends within the budget
        assert rep[name]["started_s"] + rep[name]["box_s"] <= rep["meta"]["budget_s"] + 0.2, (name, rep[name])
    impls = {r["impl"] for r in rep["parity"]["rows"]}
    assert {"torch", "mamba_ssm"} <= impls
    assert all(r["status"] == "ok" for r in rep["parity"]["rows"]), [r for r in rep["parity"]["rows"] if r["status"] != "ok"]
    assert {(r["dtype"], r["reverse"]) for r in rep["parity"]["rows"]} == {
        ("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)}
    assert {r["impl"] for r in rep["scan_timing"]["rows"]} >= {"ref", "torch", "mamba_ssm"}
    assert all(r["ms_fwd_bwd"] > 0 for r in rep["scan_timing"]["rows"])
    models = [(r["model"], r.get("scan_impl")) for r in rep["train_step"]["rows"]]
    assert models == [("deit_small_patch16_224", None), ("vim_small_patch16_224", "mamba_ssm")]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rep["train_step"]["rows"])
    assert set(rep["slws"]["models"]) == {"vim_tiny_patch16_224", "vim_small_patch16_224"}
    train = rep["short_train"]
    assert [r["impl"] for r in train["rows"]][0] == "mamba_ssm"  # the fast kernels first
    assert {r["impl"] for r in train["rows"]} == set(rep["environment"]["scan_impls"])
    assert all(r["steps"] == train["steps"] and len(r["losses"]) == train["steps"] for r in train["rows"])
    assert train["agree"] is True and set(train["max_gap"]) == {r["impl"] for r in train["rows"]}
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    begin = docs.GPU_CHECK_MARKERS[0]
    assert text.count(begin) == 1 and "### Scan parity" in text and "### Training step" in text
    assert "### Short bf16 training run" in text and "**agree**" in text
    # a second run replaces the section instead of appending another
    assert gpu_check.main(["--gpu", "--device", "cpu", "--quick", "--skip", "pytest", "scan_timing", "train_step",
                           "slws", "short_train", "--json", str(out)]) == 0
    assert docs.main(["gpu-check", str(out), "--docs", str(md)]) == 0
    assert md.read_text().count(begin) == 1


def test_a_failing_section_is_recorded_and_the_rest_still_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "parity", broken)
    rep = gpu_check.run_check(torch.device("cpu"), quick=True, skip=("pytest", "train_step", "slws", "short_train"))
    assert rep["parity"]["status"] == "error" and "kernel exploded" in rep["parity"]["error"]
    assert rep["scan_timing"]["status"] == "ok"
    assert "kernel exploded" in gpu_check_markdown(rep)


def test_a_failing_impl_is_recorded_and_the_others_still_measured():
    cpu, shapes = torch.device("cpu"), {"tiny": dict(E=8, L=5, N=2)}
    rows = gpu_check.parity(cpu, ["torch", "nope"], shapes, batch=1)
    assert {r["status"] for r in rows if r["impl"] == "torch"} == {"ok"}
    assert all(r["status"] == "error" and "unknown impl" in r["error"] for r in rows if r["impl"] == "nope")
    timing = gpu_check.scan_timing(cpu, ["torch", "nope"], shapes, batch=1, repeats=2, quick=True)
    by_impl = {}
    for r in timing["rows"]:
        by_impl.setdefault(r["impl"], set()).add(r["status"])
    assert by_impl == {"ref": {"ok"}, "torch": {"ok"}, "nope": {"error"}}


def test_time_budget_skips_later_sections():
    rep = gpu_check.run_check(torch.device("cpu"), quick=True, budget_s=1e-9, skip=("pytest",))
    assert "status" not in rep["environment"]  # always runs: the report's header
    assert rep["parity"]["status"] == "skipped" and "budget" in rep["slws"]["reason"]


@pytest.mark.slow
@no_cuda
def test_pytest_section_runs_the_gpu_tests():
    """The exact command the check runs: on a machine without CUDA every gpu test skips, exit 0."""
    res = gpu_check.run_pytest(300)
    assert res["status"] == "ok", res
    assert "skipped" in res["summary"] and "deselected" in res["summary"]


def test_time_boxes_share_what_is_left():
    sections = list(gpu_check.SECTIONS[1:])
    boxes = []
    left = 420.0
    for i in range(len(sections)):
        boxes.append(gpu_check.time_boxes(left, sections[i:]))
        left -= boxes[-1]  # each section uses its whole box: the boxes add up to the budget
    assert abs(sum(boxes) - 420.0) < 1e-6 and all(b > 0 for b in boxes)
    # a section that finishes early leaves its time to the ones after it
    assert gpu_check.time_boxes(300.0, sections[-2:]) > gpu_check.time_boxes(420.0, sections)


def test_sections_stop_at_the_end_of_their_time_box():
    """Each section checks its box per shape / impl / model: past it, the rows say so."""
    cpu, spent = torch.device("cpu"), time.monotonic() - 1
    shapes = {"tiny": dict(E=8, L=5, N=2)}
    rows = gpu_check.parity(cpu, ["torch"], shapes, batch=1, deadline=spent)
    assert len(rows) == 4 and all(r["status"] == "skipped" and "time box" in r["reason"] for r in rows)
    timing = gpu_check.scan_timing(cpu, ["torch"], shapes, batch=1, repeats=2, quick=True, deadline=spent)
    assert {r["status"] for r in timing["rows"]} == {"skipped"}
    steps = gpu_check.train_step(cpu, ["torch"], batch=1, repeats=2, quick=True, deadline=spent)
    assert [r["status"] for r in steps["rows"]] == ["skipped", "skipped"]
    assert {r["status"] for r in gpu_check.slws(cpu, 1, 2, True, deadline=spent)["models"].values()} == {"skipped"}
    train = short_train(cpu, ["torch"], steps=3, batch=1, quick=True, deadline=spent)
    assert train["rows"][0]["status"] == "skipped" and "agree" not in train


def test_slws_guards_each_model(monkeypatch):
    """One model failing costs its row, not the section."""
    real = gpu_check.make_model

    def make(name, quick, device, **kwargs):
        if name.startswith("vim_tiny"):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(name, quick, device, **kwargs)

    monkeypatch.setattr(gpu_check, "make_model", make)
    res = gpu_check.slws(torch.device("cpu"), batch=1, repeats=2, quick=True)
    tiny, small = res["models"]["vim_tiny_patch16_224"], res["models"]["vim_small_patch16_224"]
    assert tiny["status"] == "error" and "illegal memory access" in tiny["error"]
    assert small["status"] == "ok" and small["images_per_s_off"] > 0


def test_loss_agreement():
    def row(impl, losses):
        return {"impl": impl, "steps": len(losses), "losses": losses}

    base = [2.3, 2.2, 2.0, 1.8, 1.5, 1.2]
    same = loss_agreement([row("triton", base), row("torch", [v + 0.05 for v in base])], window=2)
    assert same["agree"] is True and same["compared_steps"] == 6
    apart = loss_agreement([row("triton", base), row("torch", [2.3, 2.2, 2.1, 2.2, 2.3, 2.3])], window=2)
    assert apart["agree"] is False and apart["max_gap"]["torch"] > LOSS_AGREEMENT
    diverged = loss_agreement([row("triton", base), row("torch", [2.3, float("nan")] * 3)], window=2)
    assert diverged == {}  # a NaN run is not compared (its row's losses show it)
    # curves of different lengths (a run the time box cut short) are compared over the common steps
    assert loss_agreement([row("triton", base), row("torch", base[:4])], window=2)["compared_steps"] == 4


def test_pytest_section_has_its_box_and_no_cpu_kernel_build(monkeypatch):
    seen = {}

    def fake_run(cmd, timeout_s, env=None, cwd=None):
        seen.update(cmd=cmd, timeout=timeout_s, env=env)
        return None, "collected 12 items\n", ""

    monkeypatch.setattr(gpu_check, "_run_group", fake_run)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = gpu_check.run_pytest(37.0)
    assert seen["timeout"] == 37.0 and seen["cmd"][-4:-1] == ["gpu", "-p", "no:cacheprovider"]
    assert seen["env"]["SHUFFLEMAMBA_NO_COMPILE"] == "1" and "TRITON_INTERPRET" not in seen["env"]
    assert res["status"] == "error" and "37 s time box" in res["error"]


def test_run_group_kills_the_whole_group_at_the_timeout():
    """A child that started a grandchild (as Triton starts ptxas) and hangs: both are gone at the timeout."""
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(p.pid, flush=True); time.sleep(120)")
    t0 = time.monotonic()
    rc, out, _ = gpu_check._run_group([sys.executable, "-c", code], 3.0)
    assert rc is None and time.monotonic() - t0 < 60
    grandchild = int(out.split()[0])
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived the timeout")


def test_isolated_sections_run_in_a_child_process():
    """isolate=True (the CUDA default) on the CPU: a section's rows come back from the child; a box too
    short to even start the child ends in a kill that is recorded, and the run goes on."""
    rep = gpu_check.run_check(torch.device("cpu"), quick=True, isolate=True, budget_s=600,
                              skip=("pytest", "scan_timing", "train_step", "slws", "short_train"))
    assert rep["meta"]["isolated"] is True
    assert rep["environment"]["scan_impls"] == scan_impls(torch.device("cpu"))  # from its child
    assert rep["parity"]["status"] == "ok" and {r["status"] for r in rep["parity"]["rows"]} == {"ok"}
    killed = gpu_check._in_child("parity", torch.device("cpu"), ["torch"], True, 0.3)
    assert killed["status"] == "error" and "killed at the end of its 0 s time box" in killed["error"]
    assert killed["rows"] == []


def test_environment_killed_in_its_child_still_lets_the_check_run(monkeypatch):
    """Isolated, the environment (importing mamba_ssm, its trial call) has a box too: if it is killed,
    the report says so and the sections go on with the impls that need no foreign code to find."""
    real = gpu_check._in_child

    def in_child(name, device, impls, quick, box_s):
        return real(name, device, impls, quick, 0.2 if name == "environment" else box_s)

    monkeypatch.setattr(gpu_check, "_in_child", in_child)
    rep = gpu_check.run_check(torch.device("cpu"), quick=True, isolate=True, budget_s=600,
                              skip=("pytest", "scan_timing", "train_step", "slws", "short_train"))
    assert rep["environment"]["status"] == "error" and "killed" in rep["environment"]["error"]
    assert {r["impl"] for r in rep["parity"]["rows"]} == set(scan_impls(torch.device("cpu"), False))
    assert rep["parity"]["status"] == "ok" and "**environment**: error: killed" in gpu_check_markdown(rep)
