"""Model repository: turn a spec's pipelines into model directories, write them, read them back.

A build is written to a staging directory beside `--out`, then each model directory is swapped
into place, so models already in the repository (other families, other `--name`s) are kept and
a failed build leaves the previous models untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonkit.engines import threads_per_instance
from tritonkit.errors import ConfigError, TritonkitError
from tritonkit.families.base import (
    NATIVE_THREAD_PARAMETERS,
    PLAN_MEMORY_PARAMETER,
    SERVER_MEMORY_ROLE,
    Pipeline,
    StageMemory,
)
from tritonkit.repository_format import FORMAT, FORMAT_PARAMETER, format_error
from tritonkit.stages import stage_source
from tritonkit.triton_config import (
    Batching,
    EnsembleStep,
    ModelFiles,
    ensemble_config,
    model_config,
    read_config,
    write_config,
)

VERSION = "1"
TEMPLATE_PARAMETER = "tritonkit_template"  # which tritonkit.stages module a model.py binds
REQUEST_BYTES_PARAMETER = "max_request_bytes"


@dataclass(frozen=True)
class BatchingOverrides:
    """Command-line overrides applied to every composing model; None keeps the spec's value."""

    max_batch_size: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None
    instances: int | None = None

    def apply(self, batching: Batching) -> Batching:
        return batching.override(
            max_batch_size=self.max_batch_size,
            preferred_batch_sizes=self.preferred_batch_sizes,
            max_queue_delay_us=self.max_queue_delay_us,
            instances=self.instances,
        )


def model_name(name: str, role: str) -> str:
    return f"{name}_{role}" if role else name


def plan_models(
    name: str,
    pipelines: Sequence[Pipeline],
    overrides: BatchingOverrides = BatchingOverrides(),
    max_request_bytes: int | None = None,
    memory: Mapping[str, StageMemory] | None = None,
) -> list[ModelFiles]:
    """Configs and files of every model (composing models first, then ensembles).

    `max_request_bytes` goes to every Python-backend model that reads a client's tensors, which
    rejects a larger request before any work (`tritonkit.batched_model.BatchedModel.request_bytes`)."""
    composing: dict[str, ModelFiles] = {}
    ensembles: list[ModelFiles] = []

    def add(stage, client_inputs: set[str]) -> None:
        stage_name = model_name(name, stage.role)
        if stage_name in composing:
            return
        parameters = dict(stage.parameters)
        for callee in stage.callees:
            add(callee, set())
            parameters[f"{callee.role}_model"] = model_name(name, callee.role)
        if stage.template is not None:
            parameters[TEMPLATE_PARAMETER] = stage.template
            if memory and stage.role in memory:  # what `tritonkit plan` cannot compute from the graphs
                parameters[PLAN_MEMORY_PARAMETER] = memory[stage.role].to_json()
            if max_request_bytes and client_inputs & {t.name for t in stage.inputs}:
                parameters[REQUEST_BYTES_PARAMETER] = str(max_request_bytes)
        batching = overrides.apply(stage.batching)
        if stage.backend in NATIVE_THREAD_PARAMETERS and stage.kind == "KIND_CPU":
            parameters.setdefault(
                NATIVE_THREAD_PARAMETERS[stage.backend], str(threads_per_instance(batching.instances))
            )
        config = model_config(
            stage_name,
            stage.inputs,
            stage.outputs,
            batching,
            parameters,
            backend=stage.backend,
            kind=stage.kind,
            extra=stage.config_extra,
        )
        files: dict[str, Path | bytes] = dict(stage.files)
        if stage.template is not None:
            files["model.py"] = stage_source(stage.template, FORMAT)
        composing[stage_name] = ModelFiles(config, files)

    server_memory = (memory or {}).get(SERVER_MEMORY_ROLE)
    for index, pipeline in enumerate(pipelines):
        steps, max_batch = [], None
        wired = {t.name for t in pipeline.inputs}  # what the ensemble has to give its next step
        for stage in pipeline.stages:
            stage_name = model_name(name, stage.role)
            batching = overrides.apply(stage.batching)
            max_batch = batching.max_batch_size if max_batch is None else min(max_batch, batching.max_batch_size)
            add(stage, {t.name for t in pipeline.inputs})
            steps.append(
                EnsembleStep(
                    stage_name,
                    input_map={t.name: t.name for t in stage.inputs if t.name in wired},
                    output_map={t.name: t.name for t in stage.outputs},
                )
            )
            wired |= {t.name for t in stage.outputs}
        ensemble = ensemble_config(
            model_name(name, pipeline.role),
            pipeline.inputs,
            pipeline.outputs,
            max_batch or 0,
            steps,
            response_cache=pipeline.response_cache,
            # tritonserver's own share of the family's memory (its request buffers), once per family
            parameters={PLAN_MEMORY_PARAMETER: server_memory.to_json()} if server_memory and index == 0 else None,
        )
        ensembles.append(ModelFiles(ensemble, {}))
    return [*composing.values(), *ensembles]


def _write_model(model: ModelFiles, root: Path) -> Path:
    model_dir = root / model.name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    write_config(model.config, model_dir)
    for target, source in model.files.items():
        destination = version_dir / target
        if isinstance(source, bytes):
            destination.write_bytes(source)
        elif Path(source).is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy2(source, destination)
    return model_dir


def staging_dir(out: Path) -> Path:
    """A fresh directory on the same filesystem as `out`, so the final swap is a rename.

    Takes an exclusive lock for `out` (one build at a time; a second one fails with a clear
    error) and removes what builds killed before they finished left behind."""
    import fcntl

    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f".{out.name}.lock", "w")  # noqa: SIM115 (held until release(out))
    except OSError as exc:
        raise TritonkitError(
            f"--out {out}: cannot write beside it ({exc.strerror})", hint="choose an --out in a writable directory"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise TritonkitError(
            f"--out {out}: another build is writing this repository", hint="wait for it to finish"
        ) from None
    _LOCKS[str(out)] = lock  # released when the process ends
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


_LOCKS: dict = {}


def release(out: Path) -> None:
    lock = _LOCKS.pop(str(Path(out).resolve()), None)
    if lock is not None:
        lock.close()


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return result == 0


def write_models(models: Iterable[ModelFiles], out: Path, staging: Path) -> list[str]:
    """Write the whole new repository into `staging` (the models of `out` that this build does not
    replace are hard-linked in), then swap it with `out` in one atomic step. A build killed at any
    moment leaves `out` as it was; a server reading `out` sees either repository, never a mix."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TritonkitError(f"--out {out}: cannot create the repository directory ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise TritonkitError(
            f"--out {out}: the directory is not writable", hint="choose another --out or fix its permissions"
        )
    models = list(models)
    names = {m.name for m in models}
    built = staging / "repository"
    built.mkdir(exist_ok=True)
    for model in models:
        _write_model(model, built)
    for kept in Path(out).iterdir():  # other families, other --names, files beside the models
        if kept.name not in names:
            destination = built / kept.name
            if kept.is_dir():
                shutil.copytree(kept, destination, copy_function=_link_or_copy, symlinks=True)
            else:
                _link_or_copy(kept, destination)
    if not exchange(built, out):  # not Linux: two renames, with a moment where `out` is absent
        out.rename(staging / "previous")
        built.rename(out)
    return [m.name for m in models]


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def list_models(repo: Path) -> list[str]:
    repo = Path(repo)
    if not repo.is_dir():
        raise ConfigError(f"{repo}: not a directory")
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


def read_repository(repo: Path) -> dict:
    """Parse every config.pbtxt of a repository (raises ConfigError on the first bad one)."""
    return {name: read_config(Path(repo) / name) for name in list_models(repo)}


def check_format(repo: Path) -> None:
    """Refuse a repository holding models of another format (`tritonkit.repository_format`)."""
    from tritonkit.triton_config import parameter

    found = {name: parameter(config, FORMAT_PARAMETER) for name, config in read_repository(repo).items()}
    stale = sorted(name for name, value in found.items() if format_error(name, value) is not None)
    named = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
    error = format_error(f"{repo}: {named}", found[stale[0]]) if stale else None
    if error is not None:
        raise error
