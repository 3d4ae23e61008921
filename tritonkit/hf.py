"""Loading from the Hugging Face Hub or a local `save_pretrained` directory, with clear errors."""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from tritonkit.errors import ModelSourceError

HUB_PROBE_TIMEOUT_S = 3.0  # how long a Hub id waits to learn whether the Hub can be reached at all


def looks_local(source: str) -> bool:
    """A path, not a Hub id ("org/name"): it exists, starts like a path, has more than one "/", or
    its first part is a local directory ("demo/tiny-clp" beside demo/): never sent to the Hub."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return True
    parts = source.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub can be asked at all: not with HF_HUB_OFFLINE set, nor when a TCP connection
    to its endpoint does not open within `timeout_s`. Without this a Hub id on a machine with no
    Hub access fails only after huggingface_hub's retries (about 30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    return _connects(hub_endpoint(), timeout_s)


@functools.cache
def _connects(endpoint: str, timeout_s: float) -> bool:
    """A TCP connection to `endpoint` opens within `timeout_s` (name lookup included: it runs in a
    thread, as getaddrinfo has no timeout of its own)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(opened)


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
    elif not hub_reachable():  # only the Hub's cache on this machine can answer, and at once
        try:
            return loader.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError):
            raise ModelSourceError(
                f"--model {source}: no such directory here, and the Hugging Face Hub ({hub_endpoint()}) "
                "cannot be reached to fetch it as a Hub id",
                hint="fix the path, or download the model where the Hub is reachable and pass its directory",
            ) from None
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = None if looks_local(source) else "no Hub access? download it elsewhere and pass the local directory"
        raise ModelSourceError(f"--model {source}: cannot load the {what}: {first_line}", hint=hint) from exc
