#!/usr/bin/env python
"""Memory and speed of a family's repository two ways, side by side: as built by an earlier commit
and as built now (`--before REV`), or served with two allocators (`--allocators glibc jemalloc`).

Both are soaked alike (scripts/soak.py: the same mix at concurrency 16), alternating A B A B so
that both see the same machine; reports the valid requests answered per second, the resident
memory per model (the median of each run's last third), its spread over the rounds, and how far
`tritonkit plan REPO --measure REPORT` is from each run's figure per model.

    python scripts/memory_before_after.py --before 9a79e68 [--family whisper] [--duration 120]
                                          [--rounds 2] [--markdown docs/RELIABILITY.md]
    python scripts/memory_before_after.py --allocators glibc jemalloc [--family whisper] ...

The earlier repository is built from a git worktree of REV (its templates and graphs) and served
with the current library (the generic decoder loop decodes both graph layouts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.reporting import machine, markdown_table, replace_section

ROOT = Path(__file__).resolve().parent.parent


def build_at(revision: str | None, family: str, folder: Path) -> Path:
    """The family's test model built into a repository by the code at `revision` (None: this checkout)."""
    source = ROOT
    if revision is not None:
        source = folder / "worktree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(source), revision], check=True)
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from scripts.soak import tiny_repository; print(tiny_repository(sys.argv[2], Path(sys.argv[3])))"
    )
    out = folder / ("before" if revision else "after")
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(source)}
    printed = subprocess.run(
        [sys.executable, "-c", code, str(source), family, str(out)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return Path(printed.strip().splitlines()[-1])


def soak(repository: Path, family: str, duration: float, report: Path, allocator: str = "auto") -> dict:
    """One soak's report, with `plan_error` (model -> (predicted - measured) / measured) from
    `tritonkit plan --measure` on it."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--family",
            family,
            "--repository",
            str(repository),
            "--duration",
            str(duration),
            "--allocator",
            allocator,
            "--json",
            str(report),
        ],
        check=False,
        capture_output=True,
    )
    result = json.loads(report.read_text())
    plan = report.with_suffix(".plan.json")
    subprocess.run(
        [sys.executable, "-m", "tritonkit.cli", "plan", str(repository), "--measure", str(report), "--json", str(plan)],
        check=True,
        capture_output=True,
    )
    result["plan_error"] = {c["model"]: c["error"] for c in json.loads(plan.read_text())["measured"]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ways = parser.add_mutually_exclusive_group(required=True)
    ways.add_argument("--before", help="The git revision to compare with")
    ways.add_argument(
        "--allocators", nargs=2, metavar=("A", "B"), help="Serve one build with two allocators (glibc, jemalloc, ...)"
    )
    parser.add_argument("--family", default="whisper", choices=["clip", "whisper", "llava"])
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="before-after-") as folder:
        base = Path(folder)
        try:
            setups: dict[str, tuple[Path, str]]  # label -> (repository, allocator)
            if args.allocators:
                repository = build_at(None, args.family, base)
                setups = {allocator: (repository, allocator) for allocator in args.allocators}
            else:
                setups = {
                    "before": (build_at(args.before, args.family, base), "auto"),
                    "now": (build_at(None, args.family, base), "auto"),
                }
            runs: dict[str, list[dict]] = {label: [] for label in setups}
            for round_ in range(args.rounds):
                for label, (repository, allocator) in setups.items():
                    report = soak(repository, args.family, args.duration, base / f"{label}{round_}.json", allocator)
                    runs[label].append(report)
                    print(
                        f"{label} round {round_ + 1}: {report['valid_per_s']} valid/s, {report['rss_mb_after']} MB",
                        flush=True,
                    )
        finally:
            if (base / "worktree").exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base / "worktree")])
    summary: dict[str, dict] = {}
    for label, reports in runs.items():
        models = sorted({m for r in reports for m in r["rss_mb_settled"]})
        settled = {m: [r["rss_mb_settled"].get(m, 0.0) for r in reports] for m in models}
        summary[label] = {
            "valid_per_s": float(np.mean([r["valid_per_s"] for r in reports])),
            "total_mb": float(np.mean([sum(r["rss_mb_settled"].values()) for r in reports])),
            "growth_mb_last_third": float(np.max([r["rss_growth_mb_last_third"] for r in reports])),
            "models_mb": {m: float(np.mean(values)) for m, values in settled.items()},
            "models_mb_range": {m: (float(min(values)), float(max(values))) for m, values in settled.items()},
            # the plan's error per model over the rounds: (worst under-prediction, worst over-prediction)
            "plan_error_range": {
                m: (min(errors), max(errors))
                for m in {m for r in reports for m in r["plan_error"]}
                for errors in [[r["plan_error"][m] for r in reports if m in r["plan_error"]]]
            },
        }
    a, b = list(summary)
    first, second = summary[a], summary[b]

    def model_row(model: str) -> list[str]:
        def cell(figures: dict) -> str:
            low, high = figures["models_mb_range"].get(model, (0.0, 0.0))
            spread = f" ({low:,.0f}-{high:,.0f})" if args.rounds > 1 else ""
            error = figures["plan_error_range"].get(model)
            plan = f"; plan {error[0]:+.0%}..{error[1]:+.0%}" if error else ""
            return f"{figures['models_mb'].get(model, 0.0):,.0f}{spread}{plan}"

        ratio = second["models_mb"].get(model, 0.0) / max(first["models_mb"].get(model, 0.0), 1e-9)
        return [f"  {model}", cell(first), cell(second), f"{ratio:.2f}x"]

    rows = [
        [
            "valid requests answered / s",
            f"{first['valid_per_s']:.2f}",
            f"{second['valid_per_s']:.2f}",
            f"{second['valid_per_s'] / first['valid_per_s']:.2f}x",
        ],
        [
            "resident MB, all (median of the last third)",
            f"{first['total_mb']:,.0f}",
            f"{second['total_mb']:,.0f}",
            f"{second['total_mb'] / first['total_mb']:.2f}x",
        ],
        *(model_row(model) for model in sorted(set(first["models_mb"]) | set(second["models_mb"]))),
        [
            "growth middle → last third, MB (worst run)",
            f"{first['growth_mb_last_third']:+.0f}",
            f"{second['growth_mb_last_third']:+.0f}",
            "",
        ],
    ]
    headers = [f"before ({args.before})", "now"] if args.before else list(args.allocators)
    lines = markdown_table(
        [f"{args.family}: {args.duration:g} s soaks, {args.rounds} rounds A B", *headers, f"{b} / {a}"],
        rows,
        align_right_from=1,
    )
    facts = machine()
    way = f"--before {args.before}" if args.before else f"--allocators {' '.join(args.allocators)}"
    lines += [
        "",
        "Per model: the mean over the rounds of each run's settled memory (the median of its last third), the "
        "lowest and highest run in brackets, and `tritonkit plan --measure`'s error on those runs ((predicted - "
        "measured) / measured, lowest..highest).",
        "",
        f"{facts['cpus']} CPUs ({facts['processor']}), Python {facts['python']}. Rerun: `python scripts/memory_before_after.py "
        f"{way} --family {args.family} --duration {args.duration:g} --rounds {args.rounds}`.",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        if args.before:
            replace_section(args.markdown, f"memory-before-after-{args.family}", "Memory before and after", lines)
        else:
            replace_section(args.markdown, f"memory-allocators-{args.family}", f"Allocators: {a} and {b}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
