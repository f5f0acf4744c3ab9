"""Benchmark reports: a generated markdown section kept between two markers inside a hand-written doc."""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), e.g. "AMD EPYC": CPU figures must name it,
    since machines of one kind differ (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tag(name: str) -> str:
    """A short slug of a CPU or GPU model name for file names and section markers: its first two
    words, lower case ("Intel(R) Xeon(R) Processor" -> "intel-xeon", "NVIDIA H200" -> "nvidia-h200"),
    so that figures of different machines live side by side instead of overwriting each other."""
    words = re.sub(r"\((r|tm)\)", " ", name.lower()).replace("processor", " ").split()
    slug = "-".join(re.sub(r"[^a-z0-9]+", "-", w).strip("-") for w in words[:2])
    return slug or "unknown"


def format_number(x: Any, spec: str = ".1f") -> str:
    """``x`` formatted with ``spec``, or "-" for a figure that is missing (None) or not a number."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def write_marked_section(path: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` between the ``begin`` / ``end`` markers in ``path``, keeping everything else.

    The markers are appended (with the section) when the file lacks them, so the first run of a
    benchmark adds its section and later runs replace it in place.
    """
    block = f"{begin}\n{section}{end}\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
