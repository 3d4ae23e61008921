"""Who spoke when: speaker embeddings of sliding windows over the speech, clustered into speakers.

The method (resemblyzer's own demo, with a clustering instead of known speakers): the speech a VAD
found is covered by windows of WINDOW_S every STEP_S (a speech region shorter than a window is one
window); each window's speaker embedding (a GE2E partial: `tritonkit.preprocessing.voice`);
agglomerative clustering of the windows by cosine distance, average linkage, cut at a calibrated
distance or at a given number of speakers; each instant of speech gets the speaker of the window
centred nearest to it, and consecutive instants of one speaker are a turn. A transcript's segment
(or word) is its most overlapping turn's speaker.

What it cannot do: overlapping speech gets one speaker (the window's embedding is a blend; the
louder voice usually wins); a turn shorter than about a window (a back-channel "yes") is often
absorbed by its neighbours; the distance threshold is calibrated on the voices it was measured on
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WINDOW_S = 1.6  # one GE2E partial utterance
STEP_S = 0.4
MIN_WINDOWS = 3  # a cluster of fewer windows is absorbed (STEP_S x 3: 1.2 s of speech)
DEFAULT_THRESHOLD = 0.3  # cosine distance where clusters stop merging: scripts/diarization_calibrate.py


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: int


def windows(
    speech: Sequence[tuple[float, float]], window_s: float = WINDOW_S, step_s: float = STEP_S
) -> list[tuple[float, float]]:
    """Windows of `window_s` every `step_s` over each speech region (start, end in seconds); a region
    shorter than a window is one window, the last window of a region ends at its end."""
    found: list[tuple[float, float]] = []
    for start, end in speech:
        if end - start <= window_s:
            found.append((start, end))
            continue
        t = start
        while t + window_s < end:
            found.append((t, t + window_s))
            t += step_s
        found.append((end - window_s, end))
    return found


def cluster(
    embeddings: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    num_speakers: int | None = None,
    min_speakers: int = 1,
    max_speakers: int | None = None,
    min_windows: int = MIN_WINDOWS,
) -> np.ndarray:
    """A speaker label per embedding (0, 1, ... in order of first appearance): average-linkage
    agglomerative clustering by cosine distance, cut at `threshold`, or into exactly `num_speakers`;
    the count is then held within [min_speakers, max_speakers]."""
    from scipy.cluster.hierarchy import fcluster, linkage

    count = len(embeddings)
    if count == 0:
        return np.zeros(0, dtype=int)
    if count == 1:
        return np.zeros(1, dtype=int)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    tree = linkage(unit, method="average", metric="cosine")
    if num_speakers is not None:
        labels = fcluster(tree, t=min(num_speakers, count), criterion="maxclust")
    else:  # a given count or bound is kept as given; only a count the threshold found is cleaned up
        labels = absorb_small(unit, fcluster(tree, t=threshold, criterion="distance"), min_windows)
        found = len(set(labels.tolist()))
        bounded = min(max(found, min_speakers), max_speakers or count, count)
        if bounded != found:
            labels = fcluster(tree, t=bounded, criterion="maxclust")
    order = {label: k for k, label in enumerate(dict.fromkeys(labels))}
    return np.array([order[label] for label in labels], dtype=int)


def absorb_small(unit: np.ndarray, labels: np.ndarray, min_windows: int) -> np.ndarray:
    """Clusters of fewer than `min_windows` windows (a cough, a blend of two voices) join the
    nearest larger cluster by centroid, unless every cluster is that small."""
    labels = np.asarray(labels).copy()
    sizes = {label: int((labels == label).sum()) for label in set(labels.tolist())}
    large = [label for label, size in sizes.items() if size >= min_windows]
    if not large or len(large) == len(sizes):
        return labels
    centroids = np.stack([unit[labels == label].mean(axis=0) for label in large])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    for k in np.flatnonzero(~np.isin(labels, large)):
        labels[k] = large[int(np.argmax(centroids @ unit[k]))]
    return labels


def turns(
    spans: Sequence[tuple[float, float]],
    labels: Sequence[int] | np.ndarray,
    speech: Sequence[tuple[float, float]],
    resolution_s: float = 0.05,
) -> list[Turn]:
    """Speaker turns over the speech: each instant of it labelled by the window centred nearest."""
    if not len(spans):
        return []
    centres = np.array([(a + b) / 2 for a, b in spans])
    found: list[Turn] = []
    for start, end in speech:
        times = np.arange(start, end, resolution_s) + resolution_s / 2
        nearest = np.abs(times[:, None] - centres[None, :]).argmin(axis=1)
        speakers = np.asarray(labels)[nearest]
        edges = np.flatnonzero(np.diff(speakers)) + 1
        bounds = [start, *(start + e * resolution_s for e in edges), end]
        for (a, b), who in zip(itertools.pairwise(bounds), speakers[np.r_[0, edges]]):
            if found and found[-1].speaker == int(who) and abs(found[-1].end - a) < 1e-9:
                found[-1] = Turn(found[-1].start, b, int(who))
            else:
                found.append(Turn(float(a), float(b), int(who)))
    return found


def speaker_of(start: float, end: float, found: Sequence[Turn]) -> int | None:
    """The speaker of the turn that overlaps (start, end) most; the nearest turn's if none does."""
    if not found:
        return None
    overlaps = [max(0.0, min(end, t.end) - max(start, t.start)) for t in found]
    best = int(np.argmax(overlaps))
    if overlaps[best] > 0:
        return found[best].speaker
    middle = (start + end) / 2
    return min(found, key=lambda t: min(abs(middle - t.start), abs(middle - t.end))).speaker


def rttm(found: Sequence[Turn], file_id: str, names: Sequence[str] | None = None) -> str:
    """NIST RTTM: one SPEAKER line per turn (speaker names if given, else SPEAKER_00, ...)."""

    def name(speaker: int) -> str:
        return names[speaker] if names is not None and speaker < len(names) else f"SPEAKER_{speaker:02d}"

    return "".join(
        f"SPEAKER {file_id} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {name(t.speaker)} <NA> <NA>\n"
        for t in found
        if t.end > t.start
    )
