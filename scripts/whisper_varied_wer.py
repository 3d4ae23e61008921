#!/usr/bin/env python
"""WER of the served Whisper tiny.en beside faster-whisper on varied speech, by kind of audio.

The benchmark's clips (scripts/bench_whisper.py) are one espeak-ng voice saying clear sentences;
this measures what users would see on less tidy audio: every built-in sentence in each of three
espeak-ng voices (33 clips), the same with noise at 10 dB SNR (33), long files of 6 to 8
sentences with 1 to 4 s pauses (over 30 s: long-form decoding, 4 files), and silence and
noise-only clips, where every word is a hallucination. Two settings side by side: greedy
(no timestamps) and faster-whisper's defaults (beam 5, VAD, timestamps, temperature fallback),
for the default build, the `--audio-padding features` build and faster-whisper itself.
Accuracy only: no timings.

    python scripts/whisper_varied_wer.py [--json out.json] [--markdown docs/BENCHMARKS.md]

Needs espeak-ng and `pip install faster-whisper`.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_whisper import FASTER_WHISPER_DEFAULTS

from tritonkit.accuracy import wer
from tritonkit.build import build
from tritonkit.calibration import VOICES
from tritonkit.client import TritonkitClient, pack_byte_rows
from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.samples import SENTENCES
from tritonkit.server import TritonServer, free_port

SNR_DB = 10.0


def spoken(sentence: str, voice: list[str], folder: Path, name: str) -> np.ndarray:
    path = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", *voice, "-w", str(path), sentence], check=True, capture_output=True)
    return decode_audio(path.read_bytes(), AudioRecipe())


def with_noise(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    power = float(np.mean(samples**2)) or 1e-6
    noise = rng.normal(0, np.sqrt(power / 10 ** (SNR_DB / 10)), samples.shape)
    return np.clip(samples + noise, -1, 1).astype(np.float32)


def varied_clips(folder: Path) -> list[tuple[str, np.ndarray, str]]:
    """(kind, 16 kHz samples, transcript)."""
    rng = np.random.default_rng(11)
    clips = []
    said = {}
    for v, voice in enumerate(VOICES):
        for s, sentence in enumerate(SENTENCES):
            said[v, s] = spoken(sentence, voice, folder, f"v{v}_s{s}")
            clips.append(("clean, 3 voices", said[v, s], sentence))
    for (_, s), samples in said.items():
        clips.append((f"noise at {SNR_DB:g} dB SNR", with_noise(samples, rng), SENTENCES[s]))
    for n in range(4):  # long files: 6 to 8 sentences in one voice, with pauses
        speaker = n % len(VOICES)
        chosen = [(n * 3 + k) % len(SENTENCES) for k in range(6 + n % 3)]
        parts = []
        for s in chosen:
            parts += [said[speaker, s], np.zeros(int(SAMPLE_RATE * rng.uniform(1, 4)), np.float32)]
        clips.append(("long (> 30 s, pauses)", np.concatenate(parts), " ".join(SENTENCES[s] for s in chosen)))
    for i in range(2):
        clips.append(("silence or noise only", np.zeros(SAMPLE_RATE * (3 + i * 5), np.float32), ""))
        clips.append(("silence or noise only", rng.normal(0, 0.05, SAMPLE_RATE * (3 + i * 5)).astype(np.float32), ""))
    return clips


def wav_bytes(samples: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def served(url: str, clips: list[bytes], options: dict | None) -> list[str]:
    def call(data):
        with TritonkitClient(url) as client:
            inputs = {"AUDIO": pack_byte_rows([data]), **(options or {})}
            return client.infer("whisper", inputs)["TEXT"][0, 0].decode()

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(call, clips))


def faster_whisper(samples: list[np.ndarray], defaults: bool) -> list[str]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(bundled_tiny_en()), device="cpu", compute_type="float32")
    options = (
        {"vad_filter": True}
        if defaults
        else {"beam_size": 1, "without_timestamps": True}  # as scripts/bench_whisper.py runs it greedily
    )
    return [" ".join(s.text for s in model.transcribe(a, language="en", **options)[0]) for a in samples]


def word_count(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the results into this file")
    args = parser.parse_args()
    from tritonkit.families.base import BuildOptions
    from tritonkit.families.whisper import WhisperBuildOptions

    work = Path(tempfile.mkdtemp(prefix="whisper-varied-"))
    model_dir = convert_ct2_whisper(bundled_tiny_en(), work / "tiny.en")
    builds = {"default build": work / "repo", "--audio-padding features": work / "repo-features"}
    build("whisper", str(model_dir), builds["default build"])
    build(
        "whisper",
        str(model_dir),
        builds["--audio-padding features"],
        options=BuildOptions(family=WhisperBuildOptions(audio_padding="features")),
    )
    clips = varied_clips(work)
    kinds = list(dict.fromkeys(kind for kind, _, _ in clips))
    samples = [a for _, a, _ in clips]
    data = [wav_bytes(a) for a in samples]
    references = [text for _, _, text in clips]
    print(f"{len(clips)} clips, {sum(len(a) for a in samples) / SAMPLE_RATE:.0f} s of audio", flush=True)

    transcripts: dict[tuple[str, str], list[str]] = {}
    for label, repository in builds.items():
        with TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
            transcripts["greedy", f"tritonkit, {label}"] = served(server.grpc_url, data, None)
            transcripts["faster-whisper's defaults", f"tritonkit, {label}"] = served(
                server.grpc_url, data, FASTER_WHISPER_DEFAULTS
            )
    transcripts["greedy", "faster-whisper"] = faster_whisper(samples, defaults=False)
    transcripts["faster-whisper's defaults", "faster-whisper"] = faster_whisper(samples, defaults=True)

    rows = []
    for (setting, system), texts in transcripts.items():
        row = {
            "setting": setting,
            "system": system,
            "wer_all": wer([r for r in references if r], [t for r, t in zip(references, texts) if r]),
        }
        for kind in kinds:
            chosen = [i for i, (k, _, _) in enumerate(clips) if k == kind]
            if all(references[i] == "" for i in chosen):
                row[kind] = word_count([texts[i] for i in chosen])  # hallucinated words
            else:
                row[kind] = wer([references[i] for i in chosen], [texts[i] for i in chosen])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "machine": machine(),
        "clips": {kind: sum(k == kind for k, _, _ in clips) for kind in kinds},
        "audio_seconds": sum(len(a) for a in samples) / SAMPLE_RATE,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_markdown(args.markdown, result, kinds)


def write_markdown(path: Path, result: dict, kinds: list[str]) -> None:
    clips = ", ".join(f"{kind}: {count}" for kind, count in result["clips"].items())
    header = [
        "setting",
        "system",
        "WER, speech",
        *(f"WER, {k}" if not k.startswith("silence") else "hallucinated words, silence or noise" for k in kinds),
    ]
    body = [
        [row["setting"], row["system"], f"{row['wer_all']:.3f}"]
        + [str(row[k]) if k.startswith("silence") else f"{row[k]:.3f}" for k in kinds]
        for row in result["rows"]
    ]
    lines = [
        f"{sum(result['clips'].values())} clips ({clips}), {result['audio_seconds']:.0f} s of audio; "
        f"{result['machine']['cpus']} CPUs. Command: `python scripts/whisper_varied_wer.py --markdown docs/BENCHMARKS.md`.",
        "",
        *markdown_table(header, body),
    ]
    for setting in dict.fromkeys(row["setting"] for row in result["rows"]):
        reference = next(r for r in result["rows"] if r["setting"] == setting and r["system"] == "faster-whisper")
        for row in result["rows"]:
            if row["setting"] == setting and row is not reference:
                lines += [
                    "",
                    f"{setting}, {row['system']}: WER on all speech {row['wer_all']:.3f} vs faster-whisper's "
                    f"{reference['wer_all']:.3f} ({row['wer_all'] - reference['wer_all']:+.3f}).",
                ]
    replace_section(path, "whisper_varied_wer", "Whisper tiny.en on varied speech (accuracy)", lines)


if __name__ == "__main__":
    main()
