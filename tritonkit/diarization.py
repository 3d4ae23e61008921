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
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tritonkit.errors import InputError
from tritonkit.vad import SAMPLE_RATE, VadOptions

WINDOW_S = 1.6  # one GE2E partial utterance
STEP_S = 0.4
MIN_WINDOWS = 3  # a cluster of fewer windows is absorbed (STEP_S x 3: 1.2 s of speech)
DEFAULT_THRESHOLD = 0.3  # cosine distance where clusters stop merging: scripts/diarization_calibrate.py
MAX_SPEAKERS = 32
MAX_KNOWN_SPEAKERS = 4  # as OpenAI's known_speaker_names[]
# A cluster takes a known speaker's name when its centroid is at least this similar to the
# reference clip's embedding (cosine). Measured on the espeak-ng voices of tritonkit.samples:
# a clip of the same voice 0.95-0.98, of another voice 0.59-0.92 (two American voices are as close
# as 0.92, and merge in the clustering too)
KNOWN_MIN_SIMILARITY = 0.85
# The speech that is diarized: shorter silences split it than Whisper's VAD filter's 2 s, so a
# quick change of speaker is a region boundary (the calibration's setting)
SPEECH_VAD = VadOptions(min_silence_duration_ms=150, speech_pad_ms=30)
# OpenAI's VadConfig defaults, for a `server_vad` chunking strategy that leaves fields out
SERVER_VAD_DEFAULTS = {"threshold": 0.5, "silence_duration_ms": 200, "prefix_padding_ms": 300}


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


@dataclass(frozen=True)
class DiarizeOptions:
    """What a request may choose: the speaker count (exact, or bounds), the speech detection."""

    num_speakers: int | None = None
    min_speakers: int = 1
    max_speakers: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    vad: VadOptions = field(default=SPEECH_VAD)

    def __post_init__(self):
        for name, value in (("NUM_SPEAKERS", self.num_speakers), ("MAX_SPEAKERS", self.max_speakers)):
            if value is not None and not 1 <= value <= MAX_SPEAKERS:
                raise InputError(f"{name}: {value}; give 1 to {MAX_SPEAKERS} speakers")
        if not 1 <= self.min_speakers <= MAX_SPEAKERS:
            raise InputError(f"MIN_SPEAKERS: {self.min_speakers}; give 1 to {MAX_SPEAKERS} speakers")
        if self.max_speakers is not None and self.max_speakers < self.min_speakers:
            raise InputError(f"MAX_SPEAKERS: {self.max_speakers} is below MIN_SPEAKERS {self.min_speakers}")


def chunking_vad(strategy: str | None) -> VadOptions:
    """OpenAI's `chunking_strategy` as the speech detection diarization runs: "auto" (or none) the
    calibrated setting; a `server_vad` object (JSON) its threshold, silence and padding."""
    if strategy is None or strategy.strip() in ("", "auto", '"auto"'):
        return SPEECH_VAD
    try:
        given = json.loads(strategy)
    except json.JSONDecodeError:
        given = None
    if not isinstance(given, dict) or given.get("type") != "server_vad":
        raise InputError(
            f'CHUNKING: {strategy[:80]!r}; give "auto" or {{"type": "server_vad", ...}} (OpenAI\'s chunking_strategy)'
        )
    unknown = sorted(set(given) - {"type", *SERVER_VAD_DEFAULTS})
    if unknown:
        raise InputError(f"CHUNKING: unknown field {unknown[0]!r} (server_vad takes {', '.join(SERVER_VAD_DEFAULTS)})")
    chosen = SERVER_VAD_DEFAULTS | {k: v for k, v in given.items() if k != "type"}
    threshold, silence, padding = chosen["threshold"], chosen["silence_duration_ms"], chosen["prefix_padding_ms"]
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InputError(f"CHUNKING: threshold {threshold!r}; give a number between 0 and 1")
    for name, value in (("silence_duration_ms", silence), ("prefix_padding_ms", padding)):
        if not isinstance(value, int) or not 0 <= value <= 10_000:
            raise InputError(f"CHUNKING: {name} {value!r}; give whole milliseconds from 0 to 10000")
    return VadOptions(threshold=float(threshold), min_silence_duration_ms=silence, speech_pad_ms=padding)


def speech_regions(audio: np.ndarray, vad_session, options: VadOptions = SPEECH_VAD) -> list[tuple[float, float]]:
    """(start, end) seconds of the speech Silero VAD finds in 16 kHz samples."""
    from tritonkit import vad

    if not len(audio):
        return []
    probabilities = vad.speech_probabilities(vad_session, audio)
    chunks = vad.speech_chunks(probabilities, len(audio), options)
    return [(c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE) for c in chunks]


def window_mels(audio: np.ndarray, spans: Sequence[tuple[float, float]], filters: np.ndarray) -> np.ndarray:
    """Each window's mel frames as the encoder takes a partial utterance, [windows, 160, 40]; a
    window shorter than WINDOW_S (a short speech region) is its own speech repeated to fill it:
    zeros would change the LSTM's embedding (held-out DER 0.160 vs 0.189, the calibration's)."""
    from tritonkit.preprocessing import voice

    full = round(WINDOW_S * SAMPLE_RATE)
    mels = np.zeros((len(spans), voice.PARTIAL_FRAMES, voice.N_MELS), dtype=np.float32)
    for k, (start, end) in enumerate(spans):
        piece = audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        piece = np.resize(piece, full) if 0 < len(piece) < full else piece
        mel = voice.mel_spectrogram(piece, filters)[: voice.PARTIAL_FRAMES]
        mels[k, : len(mel)] = mel
    return mels


def speaker_names(
    unit: np.ndarray,
    labels: np.ndarray,
    references: np.ndarray | None = None,
    names: Sequence[str] = (),
    min_similarity: float = KNOWN_MIN_SIMILARITY,
) -> list[str]:
    """A name per speaker label: a known speaker's (`names`, their utterance embeddings
    `references`) for the cluster most like its reference, one cluster per name, when at least
    `min_similarity` alike; the others A, B, ... in order of first appearance, as OpenAI labels them."""
    count = int(labels.max()) + 1 if len(labels) else 0
    given: dict[int, str] = {}
    if count and references is not None and len(references):
        from scipy.optimize import linear_sum_assignment

        centroids = np.stack([unit[labels == k].mean(axis=0) for k in range(count)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        similarity = centroids @ (references / np.linalg.norm(references, axis=1, keepdims=True)).T
        for cluster_index, reference in zip(*linear_sum_assignment(-similarity)):
            if similarity[cluster_index, reference] >= min_similarity:
                given[int(cluster_index)] = names[reference]
    letters = (letter_label(k) for k in itertools.count())
    taken = set(given.values())
    found = []
    for k in range(count):
        if k in given:
            found.append(given[k])
            continue
        label = next(letters)
        while label in taken:
            label = next(letters)
        found.append(label)
    return found


def letter_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: OpenAI's labels of unknown speakers."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


@dataclass(frozen=True)
class Diarization:
    """Who spoke when in one file: its turns, and the speakers' names (index = Turn.speaker)."""

    found: list[Turn]
    names: list[str]

    def speaker(self, start: float, end: float) -> str:
        """The name of whoever spoke most of (start, end); A when the file had no speech found."""
        who = speaker_of(start, end, self.found)
        return self.names[who] if who is not None else letter_label(0)


def diarize(
    audio: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray],
    vad_session,
    filters: np.ndarray,
    options: DiarizeOptions = DiarizeOptions(),
    references: np.ndarray | None = None,
    names: Sequence[str] = (),
) -> Diarization:
    """The whole method on 16 kHz samples, in process: `embed` maps partials' mel frames [n, 160,
    40] to embeddings (the served stage runs the same steps, its encoder batched across requests)."""
    speech = speech_regions(audio, vad_session, options.vad)
    spans = windows(speech)
    embeddings = embed(window_mels(audio, spans, filters)) if spans else np.zeros((0, 1), np.float32)
    return labelled(embeddings, spans, speech, options, references, names)


def labelled(
    embeddings: np.ndarray,
    spans: Sequence[tuple[float, float]],
    speech: Sequence[tuple[float, float]],
    options: DiarizeOptions,
    references: np.ndarray | None = None,
    names: Sequence[str] = (),
) -> Diarization:
    """Windows' embeddings -> clusters -> turns and names."""
    if not len(spans):
        return Diarization([], [])
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = cluster(unit, options.threshold, options.num_speakers, options.min_speakers, options.max_speakers)
    return Diarization(turns(spans, labels, speech), speaker_names(unit, labels, references, names))
