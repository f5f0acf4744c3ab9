"""The command's process settings: OpenMP's wait policy (_omp.py) and glibc's malloc (_malloc.py)."""

import os
import subprocess
import sys
import time

import pytest

from shufflemamba import _malloc, _omp


def _never():
    raise AssertionError("measured although it should not have")


def test_wait_policy_user_setting_wins():
    for env in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        before = dict(env)
        assert _omp.set_wait_policy(env, cli=True, measure=_never) == "user"
        assert env == before


def test_wait_policy_spins_on_an_idle_machine_and_sleeps_on_a_busy_one():
    env: dict[str, str] = {}
    assert _omp.set_wait_policy(env, cli=True, measure=lambda: 0.05) == "spin"
    assert env == {"GOMP_SPINCOUNT": _omp.SPIN_COUNT}  # no OMP_WAIT_POLICY: libgomp honours the count
    assert "spin" in _omp.describe()
    env = {}
    assert _omp.set_wait_policy(env, cli=True, measure=lambda: 1.5) == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "busy" in _omp.describe()
    env = {}  # nothing to measure with (not Linux): the safe choice
    assert _omp.set_wait_policy(env, cli=True, measure=lambda: None) == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_invoked_as_command():
    assert _omp.invoked_as_command(["/venv/bin/shufflemamba", "train"], ["/venv/bin/python", "/venv/bin/shufflemamba"])
    assert _omp.invoked_as_command(["-m", "train"], ["python3", "-m", "shufflemamba", "train"])
    # another program's `python -m` (argv[0] is "-m" too while packages import), or a script: not the command
    assert not _omp.invoked_as_command(["-m"], ["python3", "-m", "pytest", "-q"])
    assert not _omp.invoked_as_command(["train.py"], ["python3", "train.py"])
    assert not _omp.invoked_as_command([], [])


def test_wait_policy_library_import_does_not_measure():
    env: dict[str, str] = {}
    assert _omp.set_wait_policy(env, cli=False, measure=_never) == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_other_cpu_load_sees_a_busy_process():
    idle_or_not = _omp.other_cpu_load(0.05)
    assert idle_or_not is not None and idle_or_not >= 0
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # running by now
        load = _omp.other_cpu_load(0.4)
    finally:
        busy.kill()
        busy.wait()
    assert load is not None and load > 0.3  # a spinning process is other processes' CPU use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_and_respects_opt_outs(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SHUFFLEMAMBA_MALLOC", "0")
    assert _malloc.tune_malloc() is False
    monkeypatch.delenv("SHUFFLEMAMBA_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")
    assert _malloc.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX_")
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert _malloc.tune_malloc() is True


def test_command_logs_its_wait_policy(tmp_path, make_fashion_idx):
    """`shufflemamba train` says in its log how OpenMP's threads wait (here: as the user set it)."""
    make_fashion_idx(tmp_path, 32, 16, 10)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(
        [sys.executable, "-m", "shufflemamba", "train", "--config", "demo", "--data-dir", str(tmp_path),
         "--epochs", "1", "--batch-size", "16", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OpenMP wait policy as set: OMP_WAIT_POLICY=PASSIVE" in out.stdout + out.stderr
