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


@pytest.mark.parametrize("first", ["import shufflemamba, timm", "import timm, shufflemamba",
                                   "import torchvision, shufflemamba", "import torch, torchvision"])
def test_any_import_order_works_here(first):
    """In the environment the Makefile builds, whatever the user imports first (a notebook's `import
    timm`, say): the package's own step or the start-up hook it installs defines the schemas."""
    proc = _run(first + "; import timm; timm.create_model('vim_tiny_patch16_224', num_classes=3) if 'shufflemamba' in "
                "dir() else None")
    assert proc.returncode == 0, proc.stderr[-2000:]


# this environment's own start-up hook (if the Makefile installed one) out of the way, so each test sees only its own
NO_HOOKS = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_SchemasBeforeTorchvision']\n"

FAKE_TORCHVISION = """
import torch
torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")  # as torchvision's fake-kernel registration needs
"""


def test_start_up_hook_defines_the_schemas_before_torchvision_loads(tmp_path):
    """The .pth line, processed as Python's start-up does (site.addsitedir), installs a hook that runs
    nothing until torchvision is imported, then defines the schemas first."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(FAKE_TORCHVISION)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    proc = _run(NO_HOOKS + LOAD_COMPAT + f"""
import site, sys
compat.write_pth({str(site_dir)!r}, {str(COMPAT)!r})
site.addsitedir({str(site_dir)!r})
assert "torch" not in sys.modules  # nothing heavy at start-up
import torchvision
print("ok")
""", tmp_path)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-2000:]


def test_without_the_hook_the_fake_torchvision_fails(tmp_path):
    """The check above can fail: the same fake torchvision without the hook raises."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(FAKE_TORCHVISION)
    proc = _run(NO_HOOKS + "sys.path.insert(0, %r); import torchvision" % str(tmp_path))
    assert proc.returncode != 0 and "torchvision::nms" in proc.stderr


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


def test_start_up_line_is_silent_when_the_checkout_is_gone(tmp_path):
    """The .pth line names this file by path: if the checkout moves, Python must still start cleanly."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    proc = _run(NO_HOOKS + LOAD_COMPAT + f"""
import site
compat.write_pth({str(site_dir)!r}, {str(tmp_path / 'gone' / '_compat.py')!r})
site.addsitedir({str(site_dir)!r})
print("started")
""")
    assert proc.returncode == 0 and proc.stdout.split() == ["started"] and proc.stderr == "", proc.stderr[-2000:]
