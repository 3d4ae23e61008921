"""Python-backend model sources that the repository writer copies to `<model>/1/model.py`.

Each module defines `TritonPythonModel`; the logic lives in the `tritonkit` package, which must be
installed in the Python environment the server's Python backend runs.
"""

from pathlib import Path


def template_path(name: str) -> Path:
    path = Path(__file__).with_name(f"{name}.py")
    if not path.is_file():
        raise FileNotFoundError(f"no model template named {name!r} in {path.parent}")
    return path
