"""The format of the repositories tritonkit writes: what a repository's files mean to the tritonkit
that serves it (its models' inputs, outputs and parameters, and the `tritonkit.stages` classes their
model.py files bind). Every model's config carries it; a model of another format is refused where it
would be served (the repository by `tritonkit serve` and `check`, the model by its stage at load, an
ensemble by the OpenAI gateway) with the one fix: rebuilding it.

Formats: 1, every repository written before formats were recorded; 2, model.py binds a class of
`tritonkit.stages`; 3, the chat decoders' stage is `chat_decoder` (it serves LLaVA and Qwen-VL).
"""

from __future__ import annotations

from tritonkit.errors import TritonkitError

FORMAT = 3
FORMAT_PARAMETER = "tritonkit_format"
REBUILD_HINT = "rebuild it with tritonkit build (the same family, --name and options)"


def format_error(models: str, found: str | None) -> TritonkitError | None:
    """Why models written in repository format `found` (None: unrecorded, format 1) cannot be
    served by this tritonkit; None when they can."""
    found = found or "1"
    if found == str(FORMAT):
        return None
    return TritonkitError(
        f"{models}: written in tritonkit repository format {found}, and this tritonkit serves format {FORMAT}",
        hint=REBUILD_HINT,
    )
