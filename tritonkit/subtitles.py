"""Segments as SubRip and WebVTT subtitles (the CLI and the OpenAI gateway), and the few facts
verbose_json adds. A segment is a mapping with `start`, `end` (seconds) and `text`; a timed word
one with `word`, `start`, `end`. Word-level cues are built from timed words: at most N words a
cue, or a segment's text once per word with that word underlined (the karaoke style players show).
"""

import io


def _clock(seconds: float, separator: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def srt(segments: list[dict]) -> str:
    """SubRip cues; a segment's `speaker` (diarized) leads its text: "A: ..."."""

    def text(s: dict) -> str:
        return f"{s['speaker']}: {s['text'].strip()}" if s.get("speaker") else s["text"].strip()

    blocks = [
        f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{text(s)}\n" for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def vtt(segments: list[dict]) -> str:
    """WebVTT cues; a segment's `speaker` (diarized) is the cue's voice: "<v A>..."."""

    def text(s: dict) -> str:
        return f"<v {s['speaker']}>{s['text'].strip()}" if s.get("speaker") else s["text"].strip()

    blocks = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{text(s)}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def word_cues(words: list[dict], max_words: int) -> list[dict]:
    """Cues of at most `max_words` consecutive words, each from its first word's start to its
    last word's end."""
    if max_words < 1:
        raise ValueError("max_words must be at least 1")
    cues = []
    for first in range(0, len(words), max_words):
        group = words[first : first + max_words]
        text = "".join(w["word"] for w in group).strip()
        cues.append({"start": group[0]["start"], "end": group[-1]["end"], "text": text})
    return cues


def highlighted_cues(segments: list[dict], words: list[dict]) -> list[dict]:
    """One cue per word: its segment's words with this one underlined (<u>...</u>, which SubRip
    and WebVTT players render), shown while it is spoken. A word belongs to the segment nearest
    its middle (word times may run a little past their segment's, as faster-whisper's do)."""

    def distance(segment: dict, word: dict) -> float:
        middle = (word["start"] + word["end"]) / 2
        return max(segment["start"] - middle, middle - segment["end"], 0.0)

    groups: list[list[dict]] = [[] for _ in segments]
    for word in words:
        if segments:
            groups[min(range(len(segments)), key=lambda k: distance(segments[k], word))].append(word)
    cues = []
    for mine in groups:
        for k, current in enumerate(mine):
            text = "".join(underlined(w["word"]) if i == k else w["word"] for i, w in enumerate(mine))
            cues.append({"start": current["start"], "end": current["end"], "text": text.strip()})
    return cues


def underlined(word: str) -> str:
    """The word underlined, its leading space kept outside the mark."""
    stripped = word.lstrip()
    return f"{word[: len(word) - len(stripped)]}<u>{stripped}</u>"


def language_name(code: str) -> str:
    """OpenAI's verbose_json names the language ("english"), not its code."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)


def duration(data: bytes) -> float:
    """The audio's duration in seconds, from its header (0 where the container does not say)."""
    import soundfile

    try:
        return round(float(soundfile.info(io.BytesIO(data)).duration), 3)
    except Exception:
        return 0.0
