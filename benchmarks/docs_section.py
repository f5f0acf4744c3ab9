"""Put a measuring tool's results into docs/benchmarks.md, between markers that keep everything else.

    python benchmarks/docs_section.py bench benchmarks/results/bench-cpu-intel-xeon.json
    python benchmarks/docs_section.py gpu-check benchmarks/results/gpu-check.json [--docs FILE]

``bench`` results go between ``<!-- bench:TAG:begin -->`` / ``<!-- bench:TAG:end -->``, TAG naming the
machine (``machine_tag``: "intel-xeon", "amd-epyc-zen4", "nvidia-h200"), so that runs on different machines
keep their own sections; the GPU check's go between ``<!-- gpu-check:begin/end -->``. A section whose
markers are absent is appended. The other scripts here (scan_limit.py, study.py, study_depth.py) write
their sections with :func:`write_marked_section` too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GPU_CHECK_MARKERS = ("<!-- gpu-check:begin -->", "<!-- gpu-check:end -->")


def bench_markers(tag: str) -> tuple[str, str]:
    """The begin / end markers of one machine's ``shufflemamba bench`` section."""
    return f"<!-- bench:{tag}:begin -->", f"<!-- bench:{tag}:end -->"


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


def section_of(kind: str, results: dict[str, Any]) -> tuple[str, str, str]:
    """(section, begin, end) of ``kind``'s ``results`` as the tool wrote them to JSON."""
    from shufflemamba.bench.report import bench_markdown, gpu_check_markdown, machine_tag

    if kind == "bench":
        return bench_markdown(results), *bench_markers(machine_tag(results["meta"]["device_name"], results["meta"].get("cpu_kernels")))
    section = gpu_check_markdown(results)
    return section if section.endswith("\n") else section + "\n", *GPU_CHECK_MARKERS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["bench", "gpu-check"])
    p.add_argument("results", type=Path, help="the JSON the tool wrote (--json)")
    p.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"), help="the markdown file to update")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read results '{args.results}': {err}", file=sys.stderr)
        return 2
    try:
        section, begin, end = section_of(args.kind, results)
    except (KeyError, TypeError) as err:
        print(f"error: '{args.results}' is not a {args.kind} result (missing {err})", file=sys.stderr)
        return 2
    write_marked_section(args.docs, section, begin, end)
    print(f"wrote the {args.kind} section of {args.results} into {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
