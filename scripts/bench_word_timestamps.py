#!/usr/bin/env python
"""Word timestamps against faster-whisper, and streamed transcription's first piece, in one run.

Whisper tiny.en (real weights, the bundled CTranslate2 model) is built and served on a real
tritonserver. On the built-in varied audio (the sample sentences spoken by espeak-ng in three
voices, every fourth with noise at 10 dB SNR):

- word times: every clip transcribed with WORD_TIMESTAMPS, and the same text tokens aligned by
  faster-whisper (`add_word_timestamps`, openai-whisper's algorithm in CTranslate2) on its own
  features; the start and end differences of every word (median, p95, max), and how many words
  both found. And faster-whisper's own `word_timestamps=True` transcription, words matched by text
  where both decoded the same text.
- the cost of words: clips per second with and without WORD_TIMESTAMPS at concurrency 8;
- streamed transcription: a 70 s file with TIMESTAMPS, the first piece's latency against the
  whole answer's (NAME_stream vs NAME), three runs each.

    python scripts/bench_word_timestamps.py [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit.build import build
from tritonkit.calibration import varied_speech
from tritonkit.client import TritonkitClient
from tritonkit.convert_ct2 import bundled_tiny_en, convert_ct2_whisper
from tritonkit.preprocessing.audio import SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.reporting import machine, markdown_table, replace_section
from tritonkit.samples import SENTENCES
from tritonkit.server import TritonServer, free_port

PREPEND, APPEND = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"


def faster_whisper_alignment(model, audio: np.ndarray, tokens: list[int]) -> list[tuple[str, float, float]]:
    """faster-whisper's word times for these text tokens on this clip (one window)."""
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import pad_or_trim

    features = model.feature_extractor(audio)
    frames = min(3000, features.shape[-1] - 1)
    encoder_output = model.encode(pad_or_trim(features[:, :3000]))
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    segment: dict[str, Any] = {"seek": 0, "start": 0.0, "end": len(audio) / SAMPLE_RATE, "tokens": tokens}
    model.add_word_timestamps([[segment]], tokenizer, encoder_output, frames, PREPEND, APPEND, 0.0)
    return [(w["word"], w["start"], w["end"]) for w in segment["words"]]


def differences(ours, theirs) -> list[float]:
    return [
        abs(a - b)
        for (_, a_start, a_end), (_, b_start, b_end) in zip(ours, theirs)
        for a, b in ((a_start, b_start), (a_end, b_end))
    ]


def transformers_pipeline(model_dir: Path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    model = WhisperForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    return pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
    )


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    v = np.array(values)
    return f"{np.median(v):.3f} / {np.percentile(v, 95):.3f} / {v.max():.3f}"


def long_file(clips: list[bytes]) -> bytes:
    import io

    import soundfile

    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    pieces: list[np.ndarray] = []
    spoken = [decode_audio(c, AudioRecipe()) for c in clips]
    while sum(len(p) for p in pieces) < 70 * SAMPLE_RATE:
        for part in spoken:
            pieces += [part, gap]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.concatenate(pieces)[: 70 * SAMPLE_RATE], SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="Replace the word-timestamps section of this file")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        clips = [(kind, data) for kind, data, text in varied_speech(SENTENCES, folder) if text]
        model_dir = convert_ct2_whisper(bundled_tiny_en(), folder / "tiny.en")
        repository = folder / "model_repository"
        build("whisper", str(model_dir), repository, progress=lambda message: print(message, file=sys.stderr))
        reference = WhisperModel(str(bundled_tiny_en()), device="cpu", compute_type="float32")
        asr = transformers_pipeline(model_dir)
        port = free_port()
        server = TritonServer(repository, grpc_port=port, http_port=free_port(), metrics_port=free_port())
        with server, TritonkitClient(f"127.0.0.1:{port}") as client:
            served = client.transcribe([d for _, d in clips], word_timestamps=True, concurrency=8)
            same_tokens, same_text, words, matched = [], [], 0, 0
            hf_text, hf_matched = [], 0
            for (_, data), transcript in zip(clips, served):
                audio = decode_audio(data, AudioRecipe())
                ours = [(w.word, w.start, w.end) for w in transcript.words]
                words += len(ours)
                aligned = faster_whisper_alignment(reference, audio, [t for t in transcript.tokens if t < 50256])
                if [w for w, *_ in aligned] == [w for w, *_ in ours]:
                    same_tokens += differences(ours, aligned)
                found, _ = reference.transcribe(audio, beam_size=1, word_timestamps=True, without_timestamps=True)
                theirs = [(w.word, w.start, w.end) for s in found for w in s.words]
                if [w for w, *_ in theirs] == [w for w, *_ in ours]:
                    matched += 1
                    same_text += differences(ours, theirs)
                chunks = asr(audio.copy(), return_timestamps="word", generate_kwargs={"num_beams": 1})["chunks"]
                hf = [(c["text"], *c["timestamp"]) for c in chunks]
                if [w for w, *_ in hf] == [w for w, *_ in ours]:
                    hf_matched += 1
                    hf_text += differences(ours, hf)
            # the cost of words: clips per second at concurrency 8, three rounds each, interleaved
            rates: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(3):
                for with_words in (False, True):
                    began = time.perf_counter()
                    client.transcribe([d for _, d in clips], word_timestamps=with_words or None, concurrency=8)
                    rates[with_words].append(len(clips) / (time.perf_counter() - began))
            long = long_file([d for _, d in clips])
            whole, first = [], []
            for _ in range(3):
                began = time.perf_counter()
                client.transcribe([long], timestamps=True)
                whole.append(time.perf_counter() - began)
                began = time.perf_counter()
                for index, _piece in enumerate(client.transcribe_stream(long, timestamps=True)):
                    if index == 0:
                        first.append(time.perf_counter() - began)
    plain, timed = float(np.median(rates[False])), float(np.median(rates[True]))
    rows: list[list[Any]] = [
        [
            f"transformers' ASR pipeline, return_timestamps='word' ({hf_matched} of {len(clips)} clips with the same text)",
            "",
            stats(hf_text),
        ],
        ["the same tokens aligned by faster-whisper (add_word_timestamps)", words, stats(same_tokens)],
        [
            f"faster-whisper's own word_timestamps=True ({matched} of {len(clips)} clips with the same text)",
            "",
            stats(same_text),
        ],
    ]
    lines = [
        f"Whisper tiny.en served (FP32), {len(clips)} clips of the built-in varied audio (espeak-ng, three voices, every fourth "
        f"with noise); faster-whisper {__import__('faster_whisper').__version__} FP32 on the same model. Machine: {machine()['processor']}, {machine()['cpus']} cores. "
        "Command: `python scripts/bench_word_timestamps.py --markdown docs/BENCHMARKS.md`.",
        "",
        *markdown_table(["word times against", "words", "absolute difference, s: median / p95 / max"], rows),
        "",
        f"The cost of words: {timed:.2f} clips/s with WORD_TIMESTAMPS against {plain:.2f} without at concurrency 8 "
        f"({timed / plain:.2f}x; median of three rounds).",
        "",
        "transformers' word timestamps align differently from openai-whisper and faster-whisper: the softmax over all "
        "1,500 frames before the crop to the audio, the timestamp tokens inside the DTW matrix, each token timed by the "
        "step after it and none of openai-whisper's clamps at pauses and segment ends; tritonkit follows faster-whisper.",
        "",
        f"Streamed transcription of a 70 s file with TIMESTAMPS: the first piece after {np.median(first):.2f} s, "
        f"the whole answer after {np.median(whole):.2f} s ({np.median(first) / np.median(whole):.2f}x; median of three).",
    ]
    print("\n".join(lines))
    if args.markdown:
        replace_section(args.markdown, "word-timestamps", "Word timestamps and streamed transcription", lines)


if __name__ == "__main__":
    main()
