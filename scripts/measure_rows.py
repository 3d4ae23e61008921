#!/usr/bin/env python
"""Rows per run of a CPU encoder or DALI pipeline: throughput and resident memory when a batch runs in slices.

Each setting runs in a fresh process (a fresh ONNX Runtime arena, fresh DALI buffers) on the same
random batch:

    python scripts/measure_rows.py REPO/whisper_encoder --batch 16 --rows 1 2 4 8 16 [--markdown FILE]
    python scripts/measure_rows.py REPO/whisper_log_mel --batch 32 --rows 1 4 32

The family's `Batching.rows_per_run` (written as the encoder's `rows_per_run` parameter) comes from
this table: the smallest slice that keeps the whole batch's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
path, batch, rows, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
if path.endswith(".dali"):  # a serialized CPU pipeline with one float input (Whisper's 30 s windows)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from pathlib import Path
    from tritonkit.preprocessing.dali import DaliRunner
    config = text_format.Parse((Path(path).parent.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    (value,) = config.input
    runner = DaliRunner(Path(path).read_bytes(), max_batch_size=rows)
    samples = [rng.standard_normal(list(value.dims)).astype("float32") for _ in range(batch)]
    def once():
        runner.run({value.name: samples})
else:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {}
    for value in session.get_inputs():
        shape = [batch if i == 0 else (d if isinstance(d, int) else 77) for i, d in enumerate(value.shape)]
        feed[value.name] = rng.integers(0, 100, shape) if "int" in value.type else rng.standard_normal(shape).astype("float32")
    def once():
        for start in range(0, batch, rows):
            session.run(None, {name: array[start : start + rows] for name, array in feed.items()})
once()
began = time.perf_counter()
for _ in range(repeats):
    once()
seconds = (time.perf_counter() - began) / repeats
statm = int(open("/proc/self/statm").read().split()[1]) * 4096
print(json.dumps({"rows": rows, "rows_per_s": batch / seconds, "rss_mb": statm / 2**20,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="A model folder of a CPU repository (1/model.onnx or 1/model.dali)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="Append the table to this file")
    args = parser.parse_args()
    graph = next((p for p in (args.model / "1" / "model.onnx", args.model / "1" / "model.dali") if p.is_file()), None)
    if graph is None:
        parser.error(
            f"{args.model}: no 1/model.onnx or 1/model.dali (pass an onnx_encoder or dali_pipeline model folder)"
        )
    results = []
    for rows in args.rows:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(graph), str(args.batch), str(rows), str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    whole = next((r for r in results if r["rows"] >= args.batch), results[-1])
    lines = [
        f"{args.model.name}, a batch of {args.batch} run in slices (one process each, {args.repeats} repeats):",
        "",
        "| rows per run | rows/s | vs the whole batch | resident MB |",
        "|---:|---:|---:|---:|",
        *(
            f"| {r['rows']} | {r['rows_per_s']:.2f} | {r['rows_per_s'] / whole['rows_per_s']:.2f}x | {r['rss_mb']:,.0f} |"
            for r in results
        ),
    ]
    print("\n".join(lines))
    if args.markdown:
        with args.markdown.open("a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
