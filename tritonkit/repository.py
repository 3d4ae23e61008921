"""Model repository: turn a spec's pipelines into model directories, write them, read them back.

A build is written to a staging directory beside `--out`, then each model directory is swapped
into place, so models already in the repository (other families, other `--name`s) are kept and
a failed build leaves the previous models untouched.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from model_repository_templates import template_path
from tritonkit.errors import ConfigError, TritonkitError
from tritonkit.families.base import Pipeline
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
TEMPLATE_PARAMETER = "tritonkit_template"  # which model_repository_templates source a model.py is


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


def plan_models(name: str, pipelines: Sequence[Pipeline], overrides: BatchingOverrides = BatchingOverrides()) -> list[ModelFiles]:
    """Configs and files of every model (composing models first, then ensembles)."""
    composing: dict[str, ModelFiles] = {}
    ensembles: list[ModelFiles] = []
    for pipeline in pipelines:
        steps, max_batch = [], None
        for stage in pipeline.stages:
            stage_name = model_name(name, stage.role)
            batching = overrides.apply(stage.batching)
            max_batch = batching.max_batch_size if max_batch is None else min(max_batch, batching.max_batch_size)
            if stage_name not in composing:
                parameters = dict(stage.parameters)
                if stage.template is not None:
                    parameters[TEMPLATE_PARAMETER] = stage.template
                config = model_config(
                    stage_name, stage.inputs, stage.outputs, batching, parameters, backend=stage.backend, kind=stage.kind,
                    extra=stage.config_extra,
                )
                files = dict(stage.files)
                if stage.template is not None:
                    files["model.py"] = template_path(stage.template)
                composing[stage_name] = ModelFiles(config, files)
            steps.append(
                EnsembleStep(
                    stage_name,
                    input_map={t.name: t.name for t in stage.inputs},
                    output_map={t.name: t.name for t in stage.outputs},
                )
            )
        ensemble = ensemble_config(
            model_name(name, pipeline.role), pipeline.inputs, pipeline.outputs, max_batch or 0, steps,
            response_cache=pipeline.response_cache,
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
    """A fresh directory on the same filesystem as `out`, so the final moves are renames."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def write_models(models: Iterable[ModelFiles], out: Path, staging: Path) -> list[str]:
    """Write into `staging`, then swap each model directory into `out` by rename."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TritonkitError(f"--out {out}: cannot create the repository directory ({exc.strerror})") from exc
    models = list(models)
    built = staging / "models"
    built.mkdir(exist_ok=True)
    for model in models:
        _write_model(model, built)
    for model in models:
        target = out / model.name
        if target.exists():
            target.rename(staging / f"previous-{model.name}")
        (built / model.name).rename(target)
    return [m.name for m in models]


def list_models(repo: Path) -> list[str]:
    repo = Path(repo)
    if not repo.is_dir():
        raise ConfigError(f"{repo}: not a directory")
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


def read_repository(repo: Path) -> dict:
    """Parse every config.pbtxt of a repository (raises ConfigError on the first bad one)."""
    return {name: read_config(Path(repo) / name) for name in list_models(repo)}
