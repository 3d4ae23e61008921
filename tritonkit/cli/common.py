"""What every command group shares: the Typer app, the console, option types and small parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tritonkit.errors import InputError

app = typer.Typer(
    name="tritonkit",
    help="Turn Hugging Face multimodal models into Triton Inference Server model repositories.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


console = Console(stderr=True, soft_wrap=True)


Host = Annotated[str, typer.Option(help="Address to bind (127.0.0.1 keeps the server private).")]


GrpcPort = Annotated[int, typer.Option("--grpc-port", help="gRPC port.")]


HttpPort = Annotated[int, typer.Option("--http-port", help="HTTP port.")]


MetricsPort = Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")]


Url = Annotated[str, typer.Option("--url", help="Server gRPC address host:port.")]


def labelled(label: str, style: str, text: str) -> None:
    """`label text` on stderr; the text is plain (a "[log: PATH]" or a log line's brackets are not markup)."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", text), highlight=False)


def request_items(files: list[Path] | None, texts: list[str] | None) -> list[bytes]:
    """What `bench` and `tune` send: the files' bytes, then the texts."""
    from tritonkit.client import read_inputs

    items = read_inputs(files or []) + [text.encode("utf-8") for text in (texts or [])]
    if not items:
        raise InputError("nothing to send", hint="give --input FILE (images, audio) or --text TEXT")
    return items


def int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None
