#!/usr/bin/env python
"""Speaker embeddings, side by side in one run on the same files:

- resemblyzer itself, as its README uses it: `preprocess_wav(file)` then
  `VoiceEncoder().embed_utterance(wav)`, one file after the other (its PyTorch encoder on the
  machine's cores);
- the served `speaker_audio` ensemble (resemblyzer's weights, exported) on a real tritonserver, one
  request per file, at concurrency 1 and 8.

The files: the built-in sentences in three espeak-ng voices, two to four sentences each (5-15 s).
Reports files/s, seconds of audio per second, and the served embeddings' lowest cosine to the
package's.

    python scripts/bench_speaker.py [--files 24] [--json out.json] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.reporting import machine, replace_table_section
from tritonkit.samples import SENTENCES
from tritonkit.server import TritonServer, free_port

VOICES = [("en-us", "150"), ("en+f3", "160"), ("en-gb-x-rp+m7", "140")]


def make_files(count: int, folder: Path) -> list[Path]:
    files = []
    for k in range(count):
        voice = VOICES[k % len(VOICES)]
        text = " ".join(SENTENCES[(k + j) % len(SENTENCES)] for j in range(2 + k % 3))
        path = folder / f"{k}.wav"
        subprocess.run(["espeak-ng", "-v", voice[0], "-s", voice[1], "-w", str(path), text], check=True)
        files.append(path)
    return files


def main() -> None:
    import soundfile
    from resemblyzer import VoiceEncoder, preprocess_wav

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-speaker-"))
    files = make_files(args.files, work)
    audio_s = sum(soundfile.info(str(f)).duration for f in files)
    datas = [f.read_bytes() for f in files]

    encoder = VoiceEncoder(device="cpu", verbose=False)
    encoder.embed_utterance(preprocess_wav(files[0]))  # warm
    began = time.perf_counter()
    reference = [encoder.embed_utterance(preprocess_wav(f)) for f in files]
    package_s = time.perf_counter() - began

    repository = work / "model_repository"
    build("speaker", "resemblyzer", repository)
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    rows = [
        [
            "resemblyzer (preprocess_wav + embed_utterance)",
            "sequential",
            f"{len(files) / package_s:.2f}",
            f"{audio_s / package_s:.1f}",
            "-",
        ]
    ]
    results = {"package_s": package_s, "audio_s": audio_s, "served": {}}
    with server:

        def one(data: bytes) -> np.ndarray:
            with TritonkitClient(server.grpc_url) as client:
                return client.infer("speaker_audio", {"AUDIO": pack_byte_rows([data])})["AUDIO_EMBEDS"][0]

        one(datas[0])
        for concurrency in (1, 8):
            began = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                served = list(pool.map(one, datas))
            seconds = time.perf_counter() - began
            cosine = min(float(a @ b) for a, b in zip(served, reference))
            results["served"][concurrency] = {"seconds": seconds, "min_cosine": cosine}
            rows.append(
                [
                    "tritonkit speaker_audio",
                    f"concurrency {concurrency}",
                    f"{len(files) / seconds:.2f}",
                    f"{audio_s / seconds:.1f}",
                    f"{cosine:.6f}",
                ]
            )
    best = min(r["seconds"] for r in results["served"].values())
    summary = f"Served (best concurrency) / resemblyzer's own loop: **{package_s / best:.2f}x** files per second."
    results["machine"] = machine()
    print(json.dumps(results, indent=2))
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        intro = (
            f"{len(files)} espeak-ng files ({audio_s:.0f} s of speech, three voices), {machine()['processor']}, "
            f"{machine()['cpus']} CPUs. Command: `python scripts/bench_speaker.py --markdown docs/BENCHMARKS.md`."
        )
        header = ["system", "setting", "files/s", "audio s/s", "min cosine to resemblyzer"]
        title = "Speaker embeddings (served vs resemblyzer)"
        replace_table_section(args.markdown, "bench_speaker", title, intro, header, rows, summary)


if __name__ == "__main__":
    main()
