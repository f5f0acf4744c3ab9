"""The command's process settings (shufflemamba.process): OpenMP's wait policy and glibc's malloc, and that
importing the package changes none of the process's settings."""

import os
import subprocess
import sys
import time

import pytest

from shufflemamba import process


def _never():
    raise AssertionError("measured although it should not have")


def test_wait_policy_user_setting_wins():
    for env in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        before = dict(env)
        assert process.set_wait_policy(env, measure=_never) == "user"
        assert env == before


def test_wait_policy_spins_on_an_idle_machine_and_sleeps_on_a_busy_one():
    env: dict[str, str] = {}
    assert process.set_wait_policy(env, measure=lambda: 0.05) == "spin"
    assert env == {"GOMP_SPINCOUNT": process.SPIN_COUNT}  # no OMP_WAIT_POLICY: libgomp honours the count
    assert "spin" in process.describe_wait_policy()
    env = {}
    assert process.set_wait_policy(env, measure=lambda: 1.5) == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "busy" in process.describe_wait_policy()
    env = {}  # nothing to measure with (not Linux): the safe choice
    assert process.set_wait_policy(env, measure=lambda: None) == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_invoked_as_command():
    assert process.invoked_as_command(["/venv/bin/shufflemamba", "train"], ["/venv/bin/python", "/venv/bin/shufflemamba"])
    assert process.invoked_as_command(["-m", "train"], ["python3", "-m", "shufflemamba", "train"])
    # another program's `python -m` (argv[0] is "-m" too while packages import), or a script: not the command
    assert not process.invoked_as_command(["-m"], ["python3", "-m", "pytest", "-q"])
    assert not process.invoked_as_command(["train.py"], ["python3", "train.py"])
    assert not process.invoked_as_command([], [])


IMPORT_CHECK = """
import ctypes, os, signal, sys
loaded = []
_cdll = ctypes.CDLL
def recording_cdll(name, *args, **kwargs):
    loaded.append(str(name))
    return _cdll(name, *args, **kwargs)
ctypes.CDLL = recording_cdll
env = dict(os.environ)
handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
import shufflemamba, torch, timm
m = timm.create_model("vim_tiny_patch16_224", depth=1, img_size=32, num_classes=2)
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert {s: signal.getsignal(s) for s in handlers} == handlers
assert not [n for n in loaded if "libc.so" in n], loaded  # no mallopt
print(torch.get_num_threads(), torch.get_num_interop_threads())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGUSR1")
def test_importing_the_package_changes_nothing_in_the_process():
    """A program's `import shufflemamba` (and building a model) leaves the environment, signal handlers,
    malloc and torch's thread counts as they were: those are the command's to tune, not the library's."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    ours = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads(), "
                            "torch.get_num_interop_threads())"], capture_output=True, text=True, env=env, timeout=300)
    assert ours.stdout.split() == plain.stdout.split()


def test_the_command_chooses_a_wait_policy_before_torch_loads():
    """`python -m shufflemamba` sets the policy (here the machine's load decides which); a user's value wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, sys; sys.argv = ['shufflemamba', '--help']; import shufflemamba; " \
           "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() in (["PASSIVE", "None"], ["None", process.SPIN_COUNT]), out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_other_cpu_load_sees_a_busy_process():
    idle_or_not = process.other_cpu_load(0.05)
    assert idle_or_not is not None and idle_or_not >= 0
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # running by now
        load = process.other_cpu_load(0.4)
    finally:
        busy.kill()
        busy.wait()
    assert load is not None and load > 0.3  # a spinning process is other processes' CPU use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_and_respects_opt_outs(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SHUFFLEMAMBA_MALLOC", "0")
    assert process.tune_malloc() is False
    monkeypatch.delenv("SHUFFLEMAMBA_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")
    assert process.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX_")
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert process.tune_malloc() is True


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
