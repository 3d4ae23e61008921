"""`tritonkit tune`: a configuration search, as Triton Model Analyzer does it, measured with
`tritonkit bench`.

One stage of an ensemble is tuned (by default the one where a first measurement finds the most
compute time): every point of a grid of instance counts, max batch sizes (each with itself as the
preferred batch size, or none), queue delays and threads per instance is written into a working
copy of the repository (configs copied, model files linked), served by a fresh tritonserver and
loaded at a fixed concurrency. The best point is the highest throughput whose p99 stays under the
bound; it is written into the repository's configs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonkit.errors import InputError
from tritonkit.families.base import NATIVE_THREAD_PARAMETERS
from tritonkit.repository import list_models
from tritonkit.triton_config import read_config, write_config

# the thread-count parameter per backend: the Python-backend templates read intra_op_threads
THREAD_PARAMETERS = {"python": "intra_op_threads", **NATIVE_THREAD_PARAMETERS}


@dataclass(frozen=True)
class TunePoint:
    instances: int
    max_batch_size: int
    preferred: bool  # the max batch size as the preferred batch size
    queue_delay_us: int
    threads: int  # per instance; 0 = the engine's default

    def label(self) -> str:
        return (
            f"i{self.instances} b{self.max_batch_size}{'p' if self.preferred else ''} "
            f"d{self.queue_delay_us} t{self.threads or 'auto'}"
        )


@dataclass
class TuneResult:
    point: TunePoint
    throughput: float
    p99_ms: float
    errors: int
    within_bound: bool


def grid(
    instances: Sequence[int],
    max_batch_sizes: Sequence[int],
    preferred: Sequence[bool],
    delays_us: Sequence[int],
    threads: Sequence[int],
) -> list[TunePoint]:
    points = [
        TunePoint(*values) for values in itertools.product(instances, max_batch_sizes, preferred, delays_us, threads)
    ]
    if not points:
        raise InputError("tune: the search grid is empty (give at least one value of each)")
    if any(p.instances < 1 or p.max_batch_size < 1 or p.queue_delay_us < 0 or p.threads < 0 for p in points):
        raise InputError("tune: instances and max batch sizes must be >= 1, delays and threads >= 0")
    return points


def apply(repository: Path, stage: str, point: TunePoint) -> None:
    """Write `point` into `stage`'s config, and cap the max batch size of the ensembles that call it."""
    config = read_config(repository / stage)
    if not config.dynamic_batching.ListFields() and config.max_batch_size == 0:
        raise InputError(f"tune: {stage} does not batch (max_batch_size 0); tune a stage that does")
    config.max_batch_size = point.max_batch_size
    del config.dynamic_batching.preferred_batch_size[:]
    if point.preferred:
        config.dynamic_batching.preferred_batch_size.append(point.max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = point.queue_delay_us
    del config.instance_group[1:]
    if not config.instance_group:
        config.instance_group.add()
    config.instance_group[0].count = point.instances
    key = THREAD_PARAMETERS.get(config.backend)
    if key is not None:
        if point.threads:
            config.parameters[key].string_value = str(point.threads)
        elif key in config.parameters and config.backend == "python":
            del config.parameters[key]
    write_config(config, repository / stage)
    for name in list_models(repository):
        ensemble = read_config(repository / name)
        if ensemble.platform == "ensemble" and any(s.model_name == stage for s in ensemble.ensemble_scheduling.step):
            original = ensemble.max_batch_size
            composing = [
                read_config(repository / s.model_name).max_batch_size for s in ensemble.ensemble_scheduling.step
            ]
            ensemble.max_batch_size = min(c for c in composing if c > 0) if any(composing) else original
            write_config(ensemble, repository / name)


def working_copy(repository: Path, folder: Path) -> Path:
    """The repository's configs copied and its version directories linked: a point changes only configs."""
    copy = folder / "repository"
    copy.mkdir(parents=True)
    for name in list_models(repository):
        (copy / name).mkdir()
        shutil.copy2(repository / name / "config.pbtxt", copy / name / "config.pbtxt")
        for entry in (repository / name).iterdir():
            if entry.is_dir():
                (copy / name / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    return copy


def busiest_stage(repository: Path, ensemble: str, items, concurrency: int, duration_s: float) -> str:
    """The composing model with the most compute time per request under load."""
    results = measure(repository, ensemble, items, concurrency, duration_s)
    models = results.models
    if not models:
        raise InputError(f"tune: no per-model statistics for {ensemble}; name the stage with --stage")
    return max(models, key=lambda name: models[name].compute_infer_ms * max(models[name].requests, 1))


def measure(repository: Path, ensemble: str, items, concurrency: int, duration_s: float):
    from tritonkit.bench import run_bench
    from tritonkit.server import TritonServer, free_port

    server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server.start().wait_until_ready(300)
    try:
        (result,) = run_bench(server.grpc_url, ensemble, items, [concurrency], duration_s=duration_s)
    finally:
        server.stop()
    return result


def tune(
    repository: Path,
    ensemble: str,
    items: Sequence[bytes],
    points: Sequence[TunePoint],
    *,
    stage: str | None = None,
    p99_ms: float | None = None,
    concurrency: int = 8,
    duration_s: float = 10.0,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[str, list[TuneResult], TuneResult | None]:
    """Measure every point; write the best (highest throughput with p99 <= `p99_ms`) into the
    repository. Returns the stage tuned, every result, and the best (None: no point met the bound,
    nothing written)."""
    repository = Path(repository)
    if ensemble not in list_models(repository):
        raise InputError(f"tune: {repository} has no model {ensemble!r}")
    if stage is not None and stage not in list_models(repository):
        raise InputError(f"tune: {repository} has no model {stage!r} to tune")
    with tempfile.TemporaryDirectory(prefix="tritonkit-tune-") as folder:
        copy = working_copy(repository, Path(folder))
        if stage is None:
            progress(f"finding the stage where {ensemble}'s time goes")
            stage = busiest_stage(copy, ensemble, items, concurrency, duration_s)
        progress(f"tuning {stage}: {len(points)} configurations, {duration_s:g} s each at concurrency {concurrency}")
        results = []
        for index, point in enumerate(points):
            apply(copy, stage, point)
            measured = measure(copy, ensemble, items, concurrency, duration_s)
            within = measured.errors == 0 and (p99_ms is None or measured.p99_ms <= p99_ms)
            results.append(TuneResult(point, measured.throughput, measured.p99_ms, measured.errors, within))
            progress(
                f"[{index + 1}/{len(points)}] {point.label()}: {measured.throughput:.1f} req/s, "
                f"p99 {measured.p99_ms:.0f} ms" + ("" if within else " (outside the bound)")
            )
    candidates = [r for r in results if r.within_bound]
    best = max(candidates, key=lambda r: r.throughput) if candidates else None
    if best is not None:
        apply(repository, stage, best.point)
    return stage, results, best


def table(results: Sequence[TuneResult], best: TuneResult | None) -> str:
    rows = ["| configuration | instances | max batch | preferred | queue delay (us) | threads | req/s | p99 (ms) | |"]
    rows.append("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        p = r.point
        mark = "best" if r is best else ("" if r.within_bound else "over bound")
        rows.append(
            f"| {p.label()} | {p.instances} | {p.max_batch_size} | {'yes' if p.preferred else 'no'} | "
            f"{p.queue_delay_us} | {p.threads or 'auto'} | {r.throughput:.1f} | {r.p99_ms:.0f} | {mark} |"
        )
    return "\n".join(rows)


def write_results(
    results: Sequence[TuneResult], best: TuneResult | None, stage: str, folder: Path, bound: float | None
) -> None:
    """tune.json, tune.md (the table) and tune.png (throughput against p99, the best marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "stage": stage,
        "p99_bound_ms": bound,
        "best": dataclasses.asdict(best) if best else None,
        "results": [dataclasses.asdict(r) for r in results],
    }
    (folder / "tune.json").write_text(json.dumps(payload, indent=2) + "\n")
    (folder / "tune.md").write_text(table(results, best) + "\n")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        axis.scatter(
            r.p99_ms, r.throughput, color="tab:green" if r is best else "tab:blue" if r.within_bound else "tab:gray"
        )
        axis.annotate(r.point.label(), (r.p99_ms, r.throughput), fontsize=7, textcoords="offset points", xytext=(4, 4))
    if bound is not None:
        axis.axvline(bound, color="tab:red", linestyle="--", label=f"p99 bound {bound:g} ms")
        axis.legend()
    axis.set_xlabel("p99 latency (ms)")
    axis.set_ylabel("throughput (requests/s)")
    axis.set_title(f"tritonkit tune: {stage}")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "tune.png", dpi=120)
    plt.close(figure)
