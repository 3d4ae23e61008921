"""Accuracy measures shared by tests, accuracy reports and benchmarks."""

from __future__ import annotations

import re


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation (hyphens and apostrophes inside words kept)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, number of reference words)."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1], len(ref)


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate: total edits over total reference words."""
    errors = words = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        e, n = word_errors(reference, hypothesis)
        errors, words = errors + e, words + n
    return errors / max(words, 1)


def cosines(a, b):
    """Row-wise cosine similarity of two batches (any trailing shape), in float64."""
    import numpy as np

    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b).reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)


def equal_error_rate(embeddings, speakers) -> float:
    """Speaker verification's equal error rate over every pair of utterances: the rate at the
    cosine threshold where as many different-speaker pairs are accepted as same-speaker pairs are
    rejected (the mean of the two where they cross between thresholds)."""
    import numpy as np

    unit = np.asarray(embeddings, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    first, second = np.triu_indices(len(unit), k=1)
    scores = (unit[first] * unit[second]).sum(axis=1)
    same = np.asarray(speakers)[first] == np.asarray(speakers)[second]
    if same.all() or not same.any():
        raise ValueError("an equal error rate needs pairs of the same speaker and of different ones")
    best = (2.0, 0.0)
    for threshold in np.unique(scores):
        false_accept = float((scores[~same] >= threshold).mean())
        false_reject = float((scores[same] < threshold).mean())
        best = min(best, (abs(false_accept - false_reject), (false_accept + false_reject) / 2))
    return best[1]
