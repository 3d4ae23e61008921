"""Registered model families. Importing this package registers every built-in family."""

from __future__ import annotations

from tritonkit.errors import UnknownFamilyError
from tritonkit.families.base import FamilySpec, OnnxExport, Pipeline, Stage, Tolerance, register, registry
from tritonkit.families import clip as _clip, llava as _llava, whisper as _whisper  # noqa: F401  (registers the built-ins)


def get_family(name: str) -> FamilySpec:
    families = registry()
    if name not in families:
        raise UnknownFamilyError(
            f"unknown model family {name!r}", hint=f"choose one of: {', '.join(sorted(families))}"
        )
    return families[name]()


__all__ = ["FamilySpec", "OnnxExport", "Pipeline", "Stage", "Tolerance", "get_family", "register", "registry"]
