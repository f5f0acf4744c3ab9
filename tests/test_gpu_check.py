"""``make gpu-check`` / ``shufflemamba doctor --gpu`` without a GPU: the one-line answer, and the whole
check run on the CPU at tiny sizes (``--device cpu --quick``) so its code paths are exercised here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shufflemamba  # noqa: F401  (torchvision shim before timm)
from shufflemamba.bench import gpu_check
from shufflemamba.bench.report import gpu_check_markdown
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
    for name in ("environment", "parity", "scan_timing", "train_step", "slws"):
        assert rep[name].get("status", "ok") == "ok", (name, rep[name])
    impls = {r["impl"] for r in rep["parity"]["rows"]}
    assert {"torch", "mamba_ssm"} <= impls
    assert all(r["status"] == "ok" for r in rep["parity"]["rows"]), [r for r in rep["parity"]["rows"] if r["status"] != "ok"]
    assert {(r["dtype"], r["reverse"]) for r in rep["parity"]["rows"]} == {
        ("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)}
    assert {r["impl"] for r in rep["scan_timing"]["rows"]} >= {"ref", "torch", "mamba_ssm"}
    assert all(r["ms_fwd_bwd"] > 0 for r in rep["scan_timing"]["rows"])
    models = [(r["model"], r.get("scan_impl")) for r in rep["train_step"]["rows"]]
    assert models == [("vim_small_patch16_224", "mamba_ssm"), ("deit_small_patch16_224", None)]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rep["train_step"]["rows"])
    assert set(rep["slws"]["models"]) == {"vim_tiny_patch16_224", "vim_small_patch16_224"}
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    begin = docs.GPU_CHECK_MARKERS[0]
    assert text.count(begin) == 1 and "### Scan parity" in text and "### Training step" in text
    # a second run replaces the section instead of appending another
    assert gpu_check.main(["--gpu", "--device", "cpu", "--quick", "--skip", "pytest", "scan_timing", "train_step",
                           "slws", "--json", str(out)]) == 0
    assert docs.main(["gpu-check", str(out), "--docs", str(md)]) == 0
    assert md.read_text().count(begin) == 1


def test_a_failing_section_is_recorded_and_the_rest_still_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "parity", broken)
    rep = gpu_check.run_check(torch.device("cpu"), quick=True, skip=("pytest", "train_step", "slws"))
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
