"""The Python-backend models of a repository, one module per kind of stage, each defining
`TritonPythonModel`.

A repository's `<model>/1/model.py` is not a copy of one: it binds the class of the tritonkit
installed beside the server (`stage_source`), so the code a repository runs is the library's, and
the repository's format (`tritonkit.repository.FORMAT`) says which library can run it.
"""

from __future__ import annotations

from pathlib import Path


def stage_names() -> list[str]:
    """Every stage module's name (what a spec's `Stage.template` may be)."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__")


def stage_source(name: str, repository_format: int) -> bytes:
    """The `model.py` of a Python-backend stage of kind `name`."""
    if name not in stage_names():
        raise FileNotFoundError(f"no stage named {name!r} in {Path(__file__).parent}")
    return (
        f'"""Written by tritonkit build (repository format {repository_format}): the {name} stage, whose code is\n'
        f'tritonkit.stages.{name} of the tritonkit installed beside tritonserver."""\n\n'
        f"from tritonkit.stages.{name} import TritonPythonModel  # noqa: F401\n"
    ).encode()
