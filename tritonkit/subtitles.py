"""Segments as SubRip and WebVTT subtitles (the CLI and the OpenAI gateway), and the few facts
verbose_json adds. A segment is a mapping with `start`, `end` (seconds) and `text`."""

import io


def _clock(seconds: float, separator: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def srt(segments: list[dict]) -> str:
    blocks = [
        f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def vtt(segments: list[dict]) -> str:
    blocks = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


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
