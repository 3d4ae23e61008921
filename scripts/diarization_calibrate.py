#!/usr/bin/env python
"""Diarization's clustering threshold, calibrated on assembled conversations (in process).

Conversations of 2 to 4 espeak-ng voices (of 5), 10 turns each: 1 to 3 built-in sentences a turn
(cut at 10 s), one turn in five a short back-channel ("Yes.", "Okay."), pauses of 0.2-0.8 s, the
true turns known. The pipeline of `tritonkit.diarization`, in process: Silero VAD (faster-whisper's
model; 150 ms of silence splits, 30 ms of padding), windows of 1.6 s every 0.4 s over the speech,
resemblyzer's own encoder (PyTorch) on each window's mel frames, average-linkage clustering cut at
each threshold, turns. Scored with pyannote.metrics' DiarizationErrorRate, without and with a
0.25 s collar, and how often the number of speakers is right.

    pip install '.[bench]'  # pyannote.metrics
    python scripts/diarization_calibrate.py [--conversations 6] [--first-seed 0]
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit import diarization as d
from tritonkit import vad
from tritonkit.preprocessing import voice
from tritonkit.samples import SENTENCES

VOICES = [("en-us", "150"), ("en+f3", "160"), ("en-gb-x-rp+m7", "140"), ("en+f5", "170"), ("en-us+m3", "135")]
BACKCHANNEL = ["Yes.", "Okay.", "Right.", "I see."]


def say(text, v, folder, k):
    p = folder / f"{k}.wav"
    subprocess.run(["espeak-ng", "-v", v[0], "-s", v[1], "-w", str(p), text], check=True)
    s, r = soundfile.read(str(p), dtype="float32")
    return soxr.resample(s, r, 16000).astype(np.float32)


def conversation(seed, speakers, folder):
    rng = np.random.default_rng(seed)
    pieces, truth, t = [], [], 0.0
    who = list(rng.choice(len(VOICES), speakers, replace=False))
    last = None
    for k, turn in enumerate(range(10)):
        s = int(rng.integers(speakers))
        if s == last:
            s = (s + 1) % speakers
        last = s
        if turn > 0 and rng.random() < 0.2:
            text = BACKCHANNEL[int(rng.integers(len(BACKCHANNEL)))]
        else:
            n = int(rng.integers(1, 4))
            text = " ".join(SENTENCES[int(i)] for i in rng.integers(len(SENTENCES), size=n))
        audio = say(text, VOICES[who[s]], folder, f"{seed}_{k}")
        audio = audio[: (10 * 16000)]
        pause = float(rng.uniform(0.2, 0.8))
        pieces += [audio, np.zeros(int(pause * 16000), np.float32)]
        truth.append((t, t + len(audio) / 16000, s))
        t += len(audio) / 16000 + pause
    return np.concatenate(pieces), truth


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="another seed: conversations held out from the calibration"
    )
    args = parser.parse_args()
    import torch
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate
    from resemblyzer import VoiceEncoder

    encoder = VoiceEncoder(device="cpu", verbose=False)
    filters = voice.mel_filters()
    session = vad.session(vad.bundled_model())
    folder = Path(tempfile.mkdtemp())
    convs = [
        conversation(seed, 2 + seed % 3, folder)
        for seed in range(args.first_seed, args.first_seed + args.conversations)
    ]
    thresholds = [0.15, 0.2, 0.25, 0.3, 0.35]
    scores = {th: (DiarizationErrorRate(), DiarizationErrorRate(collar=0.25)) for th in thresholds}
    counts_right = dict.fromkeys(thresholds, 0)
    for audio, truth in convs:
        probs = vad.speech_probabilities(session, audio)
        chunks = vad.speech_chunks(probs, len(audio), vad.VadOptions(min_silence_duration_ms=150, speech_pad_ms=30))
        speech = [(c["start"] / 16000, c["end"] / 16000) for c in chunks]
        spans = d.windows(speech)
        mels = []
        for a, b in spans:
            piece = audio[int(a * 16000) : int(b * 16000)]
            piece = np.pad(piece, (0, max(0, int(d.WINDOW_S * 16000) - len(piece))))
            mel = voice.mel_spectrogram(piece, filters)[: voice.PARTIAL_FRAMES]
            mels.append(np.pad(mel, ((0, voice.PARTIAL_FRAMES - len(mel)), (0, 0))))
        with torch.no_grad():
            emb = encoder(torch.from_numpy(np.stack(mels))).numpy()
        ref = Annotation()
        for a, b, s in truth:
            ref[Segment(a, b)] = f"S{s}"
        for th in thresholds:
            labels = d.cluster(emb, threshold=th)
            hyp = Annotation()
            for t in d.turns(spans, labels, speech):
                hyp[Segment(t.start, t.end)] = f"H{t.speaker}"
            for metric in scores[th]:
                metric(ref, hyp)
            counts_right[th] += int(len(set(labels.tolist())) == len({s for _, _, s in truth}))
    for th, (der, der_collar) in scores.items():
        print(
            f"threshold {th}: DER {abs(der):.3f}, with a 0.25 s collar {abs(der_collar):.3f}, "
            f"speaker count right {counts_right[th]}/{len(convs)}"
        )


if __name__ == "__main__":
    main()
