"""Benchmark reports: a generated markdown section kept between two markers inside a hand-written doc."""

from __future__ import annotations

from pathlib import Path


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
