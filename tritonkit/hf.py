"""Loading from the Hugging Face Hub or a local `save_pretrained` directory, with clear errors."""

from __future__ import annotations

from pathlib import Path

from tritonkit.errors import ModelSourceError


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def from_pretrained(loader, source: str, what: str, **kwargs):
    """`loader.from_pretrained(source)`, turning the many failure modes into one clear error."""
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelSourceError(
                f"--model {source}: no such directory", hint="pass a save_pretrained directory or a Hub id"
            )
        if not (path / "config.json").is_file() and what.endswith("model"):
            raise ModelSourceError(
                f"--model {source}: no config.json in that directory",
                hint="it must be written by save_pretrained (model, tokenizer, processor)",
            )
        source = str(path)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = None if looks_local(source) else "no Hub access? download it elsewhere and pass the local directory"
        raise ModelSourceError(f"--model {source}: cannot load the {what}: {first_line}", hint=hint) from exc
