#!/usr/bin/env python
"""Who spoke when, served beside the in-process reference on the same conversations:

- served: Whisper tiny.en built with `--diarize resemblyzer`, `whisper_diarize` on a real
  tritonserver (the speaker stage's turns), one request per conversation;
- in process: `tritonkit.diarization.diarize` with resemblyzer's own PyTorch encoder (the same
  VAD, windows and clustering).

Conversations: `tritonkit.samples.conversation` (espeak-ng voices, 10 turns, 1-3 sentences a turn,
back-channels, pauses of 0.2-0.8 s), 2, 3 and 4 speakers in turn. Scored with pyannote.metrics'
DiarizationErrorRate without and with a 0.25 s collar (its components: missed speech, false
alarm, confusion), and how often the number of speakers found is right; also the seconds each
took (the served time includes the transcription).

    pip install '.[bench]'
    python scripts/bench_diarization.py [--conversations 9] [--first-seed 200] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit import contracts as c
from tritonkit import diarization, samples, vad
from tritonkit.build import build
from tritonkit.client import TritonkitClient, pack_byte_rows, transcript
from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
from tritonkit.families.base import BuildOptions
from tritonkit.families.whisper import WhisperBuildOptions
from tritonkit.preprocessing import voice
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio
from tritonkit.reporting import machine, replace_table_section
from tritonkit.server import TritonServer, free_port


def annotation(turns):
    from pyannote.core import Annotation, Segment

    found = Annotation()
    for start, end, who in turns:
        found[Segment(start, end)] = str(who)
    return found


def main() -> None:
    import soundfile
    import torch
    from pyannote.metrics.diarization import DiarizationErrorRate
    from resemblyzer import VoiceEncoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=9)
    parser.add_argument("--first-seed", type=int, default=200, help="seeds apart from the calibration's (0-5)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-diarization-"))
    talks = []
    for k in range(args.conversations):
        audio, truth = samples.conversation(args.first_seed + k, 2 + k % 3, work)
        buffer = io.BytesIO()
        soundfile.write(buffer, audio, 16000, format="WAV")
        talks.append((buffer.getvalue(), truth))
    speech_s = sum(len(decode_audio(data, AudioRecipe())) / 16000 for data, _ in talks)

    encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(mels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(mels)).numpy()

    session, filters = vad.session(vad.bundled_model()), voice.mel_filters()
    systems: dict[str, dict] = {}

    def score(name: str, truth, turns, seconds: float) -> None:
        entry = systems.setdefault(
            name,
            {"der": DiarizationErrorRate(), "collar": DiarizationErrorRate(collar=0.25), "count": 0, "seconds": 0.0},
        )
        reference, hypothesis = annotation(truth), annotation(turns)
        entry["der"](reference, hypothesis, detailed=False)
        entry["collar"](reference, hypothesis)
        entry["count"] += int(len({w for *_, w in turns}) == len({w for *_, w in truth}))
        entry["seconds"] += seconds

    for data, truth in talks:
        began = time.perf_counter()
        found = diarization.diarize(decode_audio(data, AudioRecipe()), embed, session, filters)
        score(
            "in process (resemblyzer's PyTorch encoder)",
            truth,
            [(t.start, t.end, found.names[t.speaker]) for t in found.found],
            time.perf_counter() - began,
        )

    repository = work / "model_repository"
    model = convert_ct2_whisper(bundled_tiny_en(), work / "tiny.en")
    build("whisper", str(model), repository, options=BuildOptions(family=WhisperBuildOptions(diarize="resemblyzer")))
    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with server, TritonkitClient(server.grpc_url, timeout_s=600) as client:
        for data, truth in talks:
            inputs = {c.AUDIO: pack_byte_rows([data]), c.TIMESTAMPS: c.request_row(c.TIMESTAMPS, True)}
            began = time.perf_counter()
            result = transcript(client.infer("whisper_diarize", inputs))
            score("served whisper_diarize (transcript + speakers)", truth, result.turns, time.perf_counter() - began)

    rows, measured = [], {}
    for name, entry in systems.items():
        detail = entry["der"][:]
        total = detail["total"] or 1.0
        figures = {
            "der": abs(entry["der"]),
            "der_collar": abs(entry["collar"]),
            "missed": detail["missed detection"] / total,
            "false_alarm": detail["false alarm"] / total,
            "confusion": detail["confusion"] / total,
            "count_right": entry["count"],
            "seconds": entry["seconds"],
        }
        measured[name] = figures
        rows.append(
            [
                name,
                f"{figures['der']:.3f}",
                f"{figures['der_collar']:.3f}",
                f"{figures['missed']:.3f}",
                f"{figures['false_alarm']:.3f}",
                f"{figures['confusion']:.3f}",
                f"{entry['count']}/{len(talks)}",
                f"{entry['seconds']:.1f}",
            ]
        )
    served, reference = (measured[name]["der"] for name in list(systems)[::-1])
    results = {"conversations": len(talks), "speech_s": speech_s, "systems": measured, "machine": machine()}
    summary = f"Served DER minus the in-process reference's: **{served - reference:+.3f}**."
    print(json.dumps(results, indent=2))
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        header = ["system", "DER", "DER, 0.25 s collar", "missed", "false alarm", "confusion", "speakers right", "s"]
        intro = (
            f"{len(talks)} assembled conversations (2, 3 and 4 espeak-ng voices in turn; {speech_s:.0f} s in all; "
            f"seeds {args.first_seed}-{args.first_seed + len(talks) - 1}, apart from the calibration's), "
            f"{machine()['processor']}, {machine()['cpus']} CPUs. Command: `python scripts/bench_diarization.py "
            "--markdown docs/BENCHMARKS.md`."
        )
        title = "Diarization: served vs in process"
        replace_table_section(args.markdown, "bench_diarization", title, intro, header, rows, summary, 1)


if __name__ == "__main__":
    main()
