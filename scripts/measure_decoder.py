#!/usr/bin/env python
"""Whisper's window decoder in process: seconds and resident memory to decode a batch of windows.

The same spoken sentences (espeak-ng) encoded once and repeated to fill the batch, decoded greedily
by `WindowDecoder` over the repository's own decoder graphs (each repository in a fresh process),
three times; prints the last run's seconds, the resident memory after it and the first window's text.

    python scripts/measure_decoder.py REPO [OTHER_REPO ...] [--batch 32]

Give a repository built by an earlier commit beside one built now to compare graph layouts (the
decoder loop reads both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np, onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from transformers import AutoTokenizer
from tritonkit.preprocessing.audio import AudioRecipe, decode_audio, log_mel, split_windows
from tritonkit.samples import SENTENCES, speak
from tritonkit.whisper_decoding import DecodeOptions, DecodeSettings, WindowDecoder

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

repository, batch = Path(sys.argv[1]), int(sys.argv[2])
decoder_dir = repository / "whisper_decoder" / "1"
config = text_format.Parse((repository / "whisper_decoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
settings = DecodeSettings.from_json(config.parameters["decode_settings"].string_value)
tokenizer = AutoTokenizer.from_pretrained(str(decoder_dir / "tokenizer"))
decoder = WindowDecoder(
    ort.InferenceSession(str(decoder_dir / "cross_kv.onnx"), providers=["CPUExecutionProvider"]),
    ort.InferenceSession(str(decoder_dir / "step.onnx"), providers=["CPUExecutionProvider"]),
    settings,
)
encoder = ort.InferenceSession(str(repository / "whisper_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
mel_filters = np.load(repository / "whisper_audio_preprocess" / "1" / "mel_filters.npy")
with tempfile.TemporaryDirectory() as folder:
    audio = speak(" ".join(SENTENCES[:3]), Path(folder) / "speech.wav").read_bytes()
recipe = AudioRecipe(n_mels=mel_filters.shape[0])
features = log_mel(split_windows(decode_audio(audio, recipe), recipe)[:1], mel_filters)
hidden = np.repeat(encoder.run(None, {encoder.get_inputs()[0].name: features})[0], batch, axis=0)
before = resident_mb()
for _ in range(3):
    began = time.perf_counter()
    tokens, _ = decoder.decode(hidden, [DecodeOptions() for _ in range(batch)])
    seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "resident_mb": resident_mb(), "before_mb": before,
                  "tokens": len(tokens[0]), "text": tokenizer.decode(tokens[0]).strip()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repositories", type=Path, nargs="+", help="Whisper repositories (CPU builds)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    print("| repository | windows | seconds | resident MB (before decoding) | tokens |\n|---|---:|---:|---:|---:|")
    texts = set()
    for repository in args.repositories:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(repository), str(args.batch)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        texts.add(result["text"])
        print(
            f"| {repository} | {args.batch} | {result['seconds']:.2f} | {result['resident_mb']:,.0f} "
            f"({result['before_mb']:,.0f}) | {result['tokens']} |"
        )
    print(f"\ntexts: {sorted(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
