#!/usr/bin/env python
"""Memory and speed of a family's repository as built by an earlier commit and as built now, side by side.

Both repositories are soaked alike (scripts/soak.py: the same mix at concurrency 16), alternating
A B A B so that both see the same machine; reports the valid requests answered per second and the
resident memory per model (the median of each run's last third).

    python scripts/memory_before_after.py --before 9a79e68 [--family whisper] [--duration 120]
                                          [--rounds 2] [--markdown docs/RELIABILITY.md]

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


def soak(repository: Path, family: str, duration: float, report: Path) -> dict:
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
            "--json",
            str(report),
        ],
        check=False,
        capture_output=True,
    )
    return json.loads(report.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="The git revision to compare with")
    parser.add_argument("--family", default="whisper", choices=["clip", "whisper", "llava"])
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="before-after-") as folder:
        base = Path(folder)
        try:
            repositories = {
                "before": build_at(args.before, args.family, base),
                "after": build_at(None, args.family, base),
            }
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for round_ in range(args.rounds):
                for label, repository in repositories.items():
                    report = soak(repository, args.family, args.duration, base / f"{label}{round_}.json")
                    runs[label].append(report)
                    print(f"{label} round {round_ + 1}: {report['valid_per_s']} valid/s, {report['rss_mb_after']} MB")
        finally:
            if (base / "worktree").exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base / "worktree")])
    summary: dict[str, dict] = {}
    for label, reports in runs.items():
        models = sorted({m for r in reports for m in r["rss_mb_settled"]})
        summary[label] = {
            "valid_per_s": float(np.mean([r["valid_per_s"] for r in reports])),
            "total_mb": float(np.mean([sum(r["rss_mb_settled"].values()) for r in reports])),
            "growth_mb_last_third": float(np.max([r["rss_growth_mb_last_third"] for r in reports])),
            "models_mb": {m: float(np.mean([r["rss_mb_settled"].get(m, 0.0) for r in reports])) for m in models},
        }
    before, after = summary["before"], summary["after"]
    rows = [
        [
            "valid requests answered / s",
            f"{before['valid_per_s']:.2f}",
            f"{after['valid_per_s']:.2f}",
            f"{after['valid_per_s'] / before['valid_per_s']:.2f}x",
        ],
        [
            "resident MB, all (median of the last third)",
            f"{before['total_mb']:,.0f}",
            f"{after['total_mb']:,.0f}",
            f"{after['total_mb'] / before['total_mb']:.2f}x",
        ],
        *(
            [
                f"  {model}",
                f"{before['models_mb'].get(model, 0.0):,.0f}",
                f"{after['models_mb'].get(model, 0.0):,.0f}",
                f"{after['models_mb'].get(model, 0.0) / max(before['models_mb'].get(model, 0.0), 1e-9):.2f}x",
            ]
            for model in sorted(set(before["models_mb"]) | set(after["models_mb"]))
        ),
        [
            "growth middle → last third, MB (worst run)",
            f"{before['growth_mb_last_third']:+.0f}",
            f"{after['growth_mb_last_third']:+.0f}",
            "",
        ],
    ]
    lines = markdown_table(
        [
            f"{args.family}: {args.duration:g} s soaks, {args.rounds} rounds A B",
            f"before ({args.before})",
            "now",
            "now / before",
        ],
        rows,
        align_right_from=1,
    )
    facts = machine()
    lines += [
        "",
        f"{facts['cpus']} CPUs ({facts['processor']}), Python {facts['python']}. Rerun: `python scripts/memory_before_after.py "
        f"--before {args.before} --family {args.family} --duration {args.duration:g} --rounds {args.rounds}`.",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        replace_section(args.markdown, f"memory-before-after-{args.family}", "Memory before and after", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
