"""tritonkit.diarization's pieces: windows over speech, clustering, turns, segment speakers, RTTM.

The pipeline's accuracy on assembled conversations is measured by scripts/diarization_calibrate.py
(DER with pyannote.metrics); these tests pin each step's contract on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from tritonkit import diarization as d


def voices(per_speaker: list[int], dim: int = 32, spread: float = 0.1, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Embeddings scattered around one random direction per speaker, in the given order of counts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(per_speaker), dim))
    rows, truth = [], []
    for speaker, count in enumerate(per_speaker):
        for _ in range(count):
            rows.append(
                centres[speaker] + spread * np.linalg.norm(centres[speaker]) * rng.normal(size=dim) / np.sqrt(dim)
            )
            truth.append(speaker)
    return np.array(rows), truth


def test_windows_cover_each_speech_region_to_its_end():
    spans = d.windows([(0.0, 1.0), (2.0, 4.0)], window_s=1.6, step_s=0.4)
    assert spans[0] == (0.0, 1.0)  # shorter than a window: one window
    rest = spans[1:]
    assert rest[0] == (2.0, 3.6) and rest[-1] == pytest.approx((2.4, 4.0))
    assert all(b - a == pytest.approx(1.6) for a, b in rest)


@pytest.mark.parametrize("counts", [[10, 8], [6, 6, 6], [12, 5, 7, 9]])
def test_well_separated_voices_are_found_with_the_default_threshold_and_labelled_in_order(counts):
    embeddings, truth = voices(counts)
    labels = d.cluster(embeddings)
    assert labels.tolist() == truth  # the same partition, first speaker 0, next new one 1, ...


def test_a_given_number_of_speakers_and_bounds_override_the_threshold():
    embeddings, _ = voices([8, 8, 8])
    assert len(set(d.cluster(embeddings, num_speakers=2).tolist())) == 2
    assert len(set(d.cluster(embeddings, max_speakers=2).tolist())) == 2
    one_voice, _ = voices([12], spread=0.05)
    assert len(set(d.cluster(one_voice, min_speakers=2).tolist())) == 2
    assert d.cluster(np.zeros((0, 4))).tolist() == [] and d.cluster(np.ones((1, 4))).tolist() == [0]


def test_a_cluster_of_one_or_two_windows_joins_its_nearest_speaker():
    embeddings, _ = voices([10, 10])
    stray = embeddings[0] + 0.6 * np.linalg.norm(embeddings[0]) * np.random.default_rng(5).normal(size=32) / np.sqrt(32)
    labels = d.cluster(np.vstack([embeddings, stray]), threshold=0.05)
    assert len(set(labels.tolist())) == 2 and labels[-1] == labels[0]


def test_turns_follow_the_nearest_window_and_merge_across_a_region():
    spans = [(0.0, 1.6), (0.4, 2.0), (2.0, 3.6), (2.4, 4.0)]
    found = d.turns(spans, [0, 0, 1, 1], [(0.0, 4.0)], resolution_s=0.05)
    assert [t.speaker for t in found] == [0, 1]
    assert found[0].start == 0.0 and found[-1].end == 4.0
    assert found[0].end == pytest.approx(2.0, abs=0.051)  # halfway between the windows' centres 1.2 and 2.8
    merged = d.turns([(0.0, 1.0), (2.0, 3.0)], [0, 0], [(0.0, 1.0), (2.0, 3.0)])
    assert [(t.start, t.end, t.speaker) for t in merged] == [(0.0, 1.0, 0), (2.0, 3.0, 0)]  # silence between stays


def test_a_segment_gets_its_most_overlapping_turns_speaker_or_the_nearest():
    found = [d.Turn(0.0, 2.0, 0), d.Turn(2.0, 5.0, 1), d.Turn(7.0, 8.0, 0)]
    assert d.speaker_of(1.5, 3.0, found) == 1  # 0.5 s with speaker 0, 1.0 s with speaker 1
    assert d.speaker_of(1.0, 2.2, found) == 0
    assert d.speaker_of(5.5, 6.0, found) == 1  # in silence: the nearest turn
    assert d.speaker_of(6.6, 6.8, found) == 0
    assert d.speaker_of(0, 1, []) is None


def test_rttm_is_one_speaker_line_per_turn_with_names_when_given():
    found = [d.Turn(0.0, 1.5, 0), d.Turn(1.5, 3.25, 1), d.Turn(3.25, 3.25, 0)]
    lines = d.rttm(found, "call").splitlines()
    assert lines == [
        "SPEAKER call 1 0.000 1.500 <NA> <NA> SPEAKER_00 <NA> <NA>",
        "SPEAKER call 1 1.500 1.750 <NA> <NA> SPEAKER_01 <NA> <NA>",
    ]
    assert d.rttm(found[:1], "call", names=["Ada"]).split()[7] == "Ada"
