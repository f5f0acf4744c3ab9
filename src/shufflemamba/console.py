"""How every command-line entry point ends: one ``error:`` line for a user mistake, never a traceback.

``shufflemamba`` (cli.py) and ``python -m shufflemamba.bench`` both run through :func:`guarded`, so
neither needs to import the other (cli.py imports the tools lazily; they never import cli.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UserError
from .ops.config import KernelConfigError, check_settings


def guarded(fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run ``fn(argv)`` and return its exit code.

    A :class:`~shufflemamba.errors.UserError` prints ``error: <message>`` on stderr and returns 2;
    Ctrl-C outside the training loop (which handles it itself) prints ``interrupted`` and returns 130.
    """
    try:
        check_settings()  # a bad SHUFFLEMAMBA_CPU_* value: one line now, not a failure in the first step
        return int(fn(argv) or 0)
    except (UserError, KernelConfigError) as err:  # the kernels' settings live below the CLI's errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_bool(value: str) -> bool:
    """An argparse type for true / false flags (1, yes, on / 0, no, off)."""
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
