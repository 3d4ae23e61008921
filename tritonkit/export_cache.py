"""Validated ONNX exports kept between builds, keyed by everything that decides them.

The key hashes the model directory's files, the family, the export role, this tritonkit's own
source and the versions of torch, transformers and onnx: a rebuild from the same inputs reuses
the export (and its validation report) instead of tracing and validating again. Hub ids are not
cached (their files are only known after a download). The cache lives in $TRITONKIT_CACHE_DIR,
default ~/.cache/tritonkit/exports; deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from tritonkit.hf import looks_local


def cache_root() -> Path:
    return Path(os.environ.get("TRITONKIT_CACHE_DIR", Path.home() / ".cache" / "tritonkit")) / "exports"


def _hash_files(files, digest, root: Path) -> None:
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)


@lru_cache(maxsize=1)
def _code_and_versions() -> str:
    import onnx
    import torch
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__} {onnx.__version__}".encode())
    package = Path(__file__).parent
    _hash_files(package.rglob("*.py"), digest, package)
    return digest.hexdigest()


def export_key(model: str, family: str) -> str | None:
    """The cache key of a local model directory's exports, or None (not cacheable)."""
    if not looks_local(model) or not Path(model).expanduser().is_dir():
        return None
    root = Path(model).expanduser().resolve()
    digest = hashlib.sha256(f"{family}\n{_code_and_versions()}\n".encode())
    _hash_files((p for p in root.rglob("*") if p.is_file()), digest, root)
    return digest.hexdigest()


def fetch(key: str | None, role: str, destination: Path) -> bool:
    """Copy a cached export of `role` (model.onnx and export_report.json) into `destination`'s folder."""
    if key is None:
        return False
    cached = cache_root() / key / role
    if not (cached / "model.onnx").is_file() or not (cached / "export_report.json").is_file():
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cached / "model.onnx", destination)
    shutil.copy2(cached / "export_report.json", destination.with_name("export_report.json"))
    return True


def store(key: str | None, role: str, onnx_file: Path) -> None:
    """Keep a validated export; written beside and renamed, so a killed build leaves no half file."""
    if key is None:
        return
    target = cache_root() / key / role
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, source in (
            ("export_report.json", onnx_file.with_name("export_report.json")),
            ("model.onnx", onnx_file),
        ):
            partial = target / f".{name}.partial"
            shutil.copy2(source, partial)
            partial.rename(target / name)
    except OSError:
        pass  # a cache that cannot be written only costs time
