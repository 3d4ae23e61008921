#!/usr/bin/env python
"""Re-measure a family's fixed stage memory (`FamilySpec.memory`) from served soaks.

`tritonkit plan` predicts each model's resident memory as what its graphs and configs give plus
the stage's fixed memory (the interpreter, the libraries its template imports, tokenizers, DALI's
buffers), which only a served repository can show. This soaks the family's test repository
`--rounds` times with the default allocator (scripts/soak.py, concurrency 16), runs `tritonkit
plan --measure` on each soak, and prints each stage's figure corrected by the mean of
(measured - predicted): the values to put in the family's `memory`.

    python scripts/calibrate_memory.py --family whisper [--rounds 3] [--duration 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_before_after import build_at, soak

from tritonkit.families import get_family
from tritonkit.families.base import SERVER_MEMORY_ROLE
from tritonkit.memory import SERVER

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="whisper", choices=["clip", "whisper", "llava"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=90)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    spec = get_family(args.family)
    differences: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="calibrate-") as folder:
        repository = build_at(None, args.family, Path(folder))
        for round_ in range(args.rounds):
            report = Path(folder) / f"soak{round_}.json"
            soak(repository, args.family, args.duration, report)
            checks = json.loads(report.with_suffix(".plan.json").read_text())["measured"]
            for check in checks:
                differences.setdefault(check["model"], []).append(
                    (check["measured_bytes"] - check["predicted_bytes"]) / MIB
                )
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{c['model']} {c['measured_bytes'] / MIB:.0f} MiB ({c['error']:+.0%})" for c in checks),
                flush=True,
            )
    suggested = {}
    for model, values in sorted(differences.items()):
        role = SERVER_MEMORY_ROLE if model == SERVER else model.removeprefix(f"{args.family}_")
        now = spec.memory[role].fixed_mb if role in spec.memory else None
        if now is None:  # no figure of the family's (the plan's default)
            continue
        suggested[role] = {
            "fixed_mb_now": now,
            "fixed_mb_measured": round(now + float(np.mean(values))),
            "measured_minus_predicted_mib": [round(v, 1) for v in values],
        }
        print(f"{role:<18} fixed_mb {now:>6.0f} -> {suggested[role]['fixed_mb_measured']:>5} ({values})")
    if args.json:
        args.json.write_text(json.dumps(suggested, indent=2))


if __name__ == "__main__":
    main()
