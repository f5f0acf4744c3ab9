"""Install metadata: ranges in pyproject.toml, exact pins only in constraints-cpu.txt (the Makefile's).

The library must install beside the PyTorch a user already has (so no ``==`` and no needless upper
bound on torch / torchvision / timm), while this project's own machines keep the exact CPU set
(an unpinned torch pulls a multi-GB CUDA build here).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CORE = ("torch", "torchvision", "timm")


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = Version(spec.version)
    return pins


def test_core_dependencies_are_ranges_with_a_lower_bound():
    reqs = _requirements()
    for name in CORE:
        ops = {s.operator for s in reqs[name].specifier}
        assert ops == {">="}, f"{name}: {reqs[name]} (a lower bound only: installs beside the user's own)"


def test_pins_live_in_the_constraints_file_and_satisfy_the_ranges():
    pins, reqs = _pins(), _requirements()
    assert {"torch", "torchvision"} <= set(pins)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    optional = {r.name: r for r in map(Requirement, (d for group in extras.values() for d in group))}
    for name, version in pins.items():
        req = reqs.get(name) or optional.get(name)
        assert req is not None, f"{name} is pinned but the package does not ask for it"
        assert req.specifier.contains(version), (name, version, req)
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(PINS) torch" in makefile and "PINS   := constraints-cpu.txt" in makefile


def test_this_environment_satisfies_the_ranges():
    reqs = _requirements()
    for name in CORE:
        have = Version(importlib.metadata.version(name))
        assert reqs[name].specifier.contains(have, prereleases=True), (name, have, reqs[name])


@pytest.mark.skipif(not (REPO / "constraints-cpu.txt").exists(), reason="not a source checkout")
def test_installing_here_adds_nothing_but_the_package():
    """Resolving the package with its dependencies (no index, no build isolation) in this environment
    installs only itself: nothing swaps the torch that is here (with the pins too when this is the
    pinned environment, as `make` builds it)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "-e", str(REPO)]
    if Version(Version(importlib.metadata.version("torch")).public) == _pins()["torch"]:
        cmd += ["-c", str(REPO / "constraints-cpu.txt")]
    proc = subprocess.run(
        cmd,
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    would = [ln for ln in proc.stdout.splitlines() if ln.startswith("Would install")]
    assert would and would[-1].split()[2:] == ["shufflemamba-0.1.0"], proc.stdout[-2000:]


@pytest.mark.slow
def test_smoke_script_trains_one_epoch():
    """tests/smoke_train_step.py, the check `make check-install` runs in another environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "smoke_train_step.py")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("smoke ok:")
