#!/usr/bin/env python
"""Why faster-whisper's WER differs from transformers' on the same tiny.en model and clips.

Prints (1) faster-whisper's WER with its temperature fallback, `suppress_blank` and conditioning
turned off one at a time, (2) how its log-mel input differs from WhisperFeatureExtractor's:
on speech frames, and on the frames that pad each clip to 30 s, and (3) transformers greedy
`generate`'s WER on either log-mel (tritonkit's `--audio-padding audio` and `features`): on the
benchmark's clips, and on tritonkit's varied built-in speech (three espeak-ng voices, every fourth
sentence with noise at 10 dB SNR, a silent and a noise-only clip).

    python scripts/whisper_reference_gap.py [--clips 16]
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

from bench_whisper import make_clips

from tritonkit.accuracy import wer
from tritonkit.calibration import varied_speech
from tritonkit.convert_ct2 import bundled_tiny_en
from tritonkit.preprocessing.audio import FRAMES, HOP, SAMPLE_RATE, AudioRecipe, decode_audio
from tritonkit.samples import SENTENCES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    args = parser.parse_args()
    from faster_whisper import WhisperModel
    from faster_whisper.feature_extractor import FeatureExtractor
    from transformers import WhisperFeatureExtractor

    clips, references = make_clips(Path(tempfile.mkdtemp(prefix="whisper-gap-")), args.clips)
    samples = [decode_audio(c, AudioRecipe()) for c in clips]
    model = WhisperModel(str(bundled_tiny_en()), device="cpu", compute_type="float32")
    ablations: dict[str, dict] = {
        "default": {},
        "no temperature fallback": {"temperature": [0.0]},
        "no suppress_blank": {"temperature": [0.0], "suppress_blank": False},
        "no conditioning on previous text": {"temperature": [0.0], "condition_on_previous_text": False},
    }
    result: dict = {"faster_whisper_wer": {}}
    for name, options in ablations.items():
        texts = [
            " ".join(
                s.text for s in model.transcribe(a, beam_size=1, language="en", without_timestamps=True, **options)[0]
            )
            for a in samples
        ]
        result["faster_whisper_wer"][name] = round(wer(references, texts), 4)
    theirs, ours = FeatureExtractor(feature_size=80), WhisperFeatureExtractor(feature_size=80)
    speech, padding, fw_features, hf_features = [], [], [], []
    for a in samples:
        fw = theirs(a, padding=160)
        fw = np.pad(fw, ((0, 0), (0, max(0, FRAMES - fw.shape[1]))))[:, :FRAMES]  # as faster-whisper pads segments
        hf = ours(a, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
        n = len(a) // HOP
        speech.append(float(np.abs(fw[:, :n] - hf[:, :n]).max()))
        padding.append(float(np.abs(fw[:, n + 1 :] - hf[:, n + 1 :]).mean()))
        fw_features.append(fw)
        hf_features.append(hf)
    result["log_mel_max_abs_diff_speech_frames"] = max(speech)
    result["log_mel_mean_abs_diff_padding_frames"] = float(np.mean(padding))
    result["transformers_wer"] = transformers_wer(references, {"own": hf_features, "faster-whisper's": fw_features})
    varied = varied_speech(SENTENCES, tempfile.mkdtemp(prefix="whisper-gap-varied-"))
    varied_samples = [decode_audio(data, AudioRecipe()) for _, data, _ in varied]
    result["transformers_wer_varied_speech"] = transformers_wer(
        [text for _, _, text in varied],
        {
            "own": [
                ours(a, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0] for a in varied_samples
            ],
            "faster-whisper's": [
                np.pad(f, ((0, 0), (0, max(0, FRAMES - f.shape[1]))))[:, :FRAMES]
                for f in (theirs(a, padding=160) for a in varied_samples)
            ],
        },
    )
    print(json.dumps(result, indent=2))


def transformers_wer(references: list[str], features: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """transformers greedy `generate` on each feature set: does the padding alone explain the gap?"""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from tritonkit.convert_ct2 import convert_ct2_whisper

    converted = Path(tempfile.mkdtemp(prefix="whisper-gap-hf-")) / "tiny.en"
    convert_ct2_whisper(bundled_tiny_en(), converted)
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    processor = WhisperProcessor.from_pretrained(converted)
    result = {}
    for name, rows in features.items():
        with torch.no_grad():
            tokens = model.generate(torch.from_numpy(np.stack(rows)))
        result[name] = round(wer(references, processor.batch_decode(tokens, skip_special_tokens=True)), 4)
    return result


if __name__ == "__main__":
    main()
