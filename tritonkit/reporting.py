"""Benchmark reports: sections of docs/BENCHMARKS.md that each script regenerates in place."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": processor_name(),
        "python": platform.python_version(),
    }


def processor_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(header: list[str], rows: list[list], align_right_from: int = 2) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i < align_right_from else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def replace_section(path: Path, name: str, title: str, lines: list[str]) -> None:
    """Put `lines` between the `name` markers of `path`, adding the section under `title` if new."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = "\n".join([start, "", *lines, "", end])
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + body + "\n"
    path.write_text(text)


def replace_table_section(
    path: Path,
    name: str,
    title: str,
    intro: str,
    header: list[str],
    rows: list[list],
    summary: str,
    align_right_from: int = 2,
) -> None:
    """A benchmark's section: its one-paragraph setup, its table, its one-line conclusion."""
    replace_section(path, name, title, [intro, "", *markdown_table(header, rows, align_right_from), "", summary])


def best_seconds(function, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `function`, after one untimed warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best
