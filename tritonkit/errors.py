"""One exception hierarchy: the CLI prints any of these in one line, without a traceback."""

from __future__ import annotations

# gRPC carries an error in its trailers (8 KiB soft limit by default) and HTTP servers cap header
# sizes too: every message a served model returns stays below this, and echoed values far below.
MAX_MESSAGE_CHARS = 1000
MAX_SHOWN_CHARS = 40


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, for echoing a client's value in a message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, (str, bytes)) else ""
    return f"{text[: limit - 3]}...{length}"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters (what a served model's error may carry)."""
    return message if len(message) <= limit else message[: limit - 20] + f"... [{len(message) - limit + 20} more]"


class TritonkitError(Exception):
    """Base of every error tritonkit raises on purpose.

    `hint` tells the user how to fix it; `log_path` points at a file with details.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, log_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log_path = log_path

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f" ({self.hint})"
        if self.log_path:
            text += f" [log: {self.log_path}]"
        return text


class UnknownFamilyError(TritonkitError):
    pass


class ModelSourceError(TritonkitError):
    """The --model argument cannot be loaded (missing directory, no network, wrong family)."""


class ExportError(TritonkitError):
    """An ONNX export failed or does not match PyTorch within the spec's tolerance."""


class ConfigError(TritonkitError):
    """A config.pbtxt does not parse, or a repository is inconsistent."""


class ServerError(TritonkitError):
    """tritonserver could not be found, started, or it failed to load a model."""


class InferenceError(TritonkitError):
    """A request to the server failed."""


class InputError(TritonkitError):
    """One request's input is invalid; it fails alone, never its batch mates.

    `reason` is a short fixed word (one of REJECT_REASONS) that labels the served models'
    rejected-inputs counter, so dashboards can group rejections without parsing messages.
    """

    def __init__(self, message: str, *, reason: str = "invalid", hint: str | None = None, log_path: str | None = None):
        super().__init__(message, hint=hint, log_path=log_path)
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason


REJECT_REASONS = (
    "invalid",
    "empty",
    "too_large",
    "too_long",
    "undecodable",
    "unsupported_format",
    "decompression_bomb",
    "bad_text",
    "bad_option",
    "no_voice",  # audio that holds no voice to embed (speaker embeddings)
)
