"""The torchvision step in ``shufflemamba._compat``: applied only where torchvision's compiled ops cannot
load (a CUDA torchvision beside a CPU torch, as on this project's machines), silent elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parents[1] / "src" / "shufflemamba" / "_compat.py"


def _run(code: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


LOAD_COMPAT = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("compat_under_test", {str(COMPAT)!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
"""


def test_here_it_applies_exactly_when_torchvision_needs_it():
    plain = _run("import torch, torchvision")
    needed = plain.returncode != 0
    if needed:
        assert "torchvision::" in plain.stderr, plain.stderr[-500:]
    proc = _run("import shufflemamba, torchvision, timm; from shufflemamba import _compat; print(_compat.applied)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(needed)]


def test_importing_the_package_prints_nothing():
    proc = _run("import shufflemamba")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr[-2000:]


@pytest.mark.parametrize("body,expect", [
    ("", "applied False"),  # a normal torchvision: nothing to do
    ("raise RuntimeError('CUDA driver too old')", "raised RuntimeError: CUDA driver too old"),  # not ours to hide
], ids=["normal-install", "other-error"])
def test_normal_install_untouched_and_other_errors_propagate(tmp_path, body, expect):
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(body + "\n")
    proc = _run(LOAD_COMPAT + """
try:
    compat.ensure_torchvision()
    print("applied", compat.applied, compat._library is None)
except RuntimeError as e:
    print("raised RuntimeError:", e)
""", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(expect), proc.stdout
    assert proc.stderr == ""


def test_missing_torchvision_is_left_to_timm(tmp_path):
    proc = _run("import sys; sys.modules['torchvision'] = None\n" + LOAD_COMPAT
                + "compat.ensure_torchvision(); print(compat.applied)")
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr[-2000:]
