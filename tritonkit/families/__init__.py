"""Registered model families. Importing this package registers every module in it: a family is one
file here with one `@register`ed spec, and everything else (CLI, builds, tests) reads the registry."""

from __future__ import annotations

import importlib
import pkgutil

from tritonkit.errors import UnknownFamilyError
from tritonkit.families.base import FamilySpec, OnnxExport, Pipeline, Stage, Tolerance, register, registry

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_family(name: str) -> FamilySpec:
    families = registry()
    if name not in families:
        raise UnknownFamilyError(f"unknown model family {name!r}", hint=f"choose one of: {', '.join(sorted(families))}")
    return families[name]()


def family_names() -> list[str]:
    return sorted(registry())


__all__ = [
    "FamilySpec",
    "OnnxExport",
    "Pipeline",
    "Stage",
    "Tolerance",
    "family_names",
    "get_family",
    "register",
    "registry",
]
