"""Loading from the Hugging Face Hub or a local `save_pretrained` directory, with clear errors."""

from __future__ import annotations

from pathlib import Path

from tritonkit.errors import ModelSourceError


def looks_local(source: str) -> bool:
    """A path, not a Hub id ("org/name"): it exists, starts like a path, has more than one "/", or
    its first part is a local directory ("demo/tiny-clp" beside demo/): never sent to the Hub."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return True
    parts = source.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


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
