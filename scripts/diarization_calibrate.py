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

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonkit import diarization as d
from tritonkit import vad
from tritonkit.preprocessing import voice
from tritonkit.samples import conversation


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
        speech = d.speech_regions(audio, session, d.SPEECH_VAD)
        spans = d.windows(speech)
        mels = d.window_mels(audio, spans, filters)
        with torch.no_grad():
            emb = encoder(torch.from_numpy(mels)).numpy()
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
