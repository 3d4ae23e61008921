"""Commands that check and deploy a repository: check, k8s, plan."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tritonkit.cli.common import (
    app,
    console,
    labelled,
)
from tritonkit.errors import InputError
from tritonkit.promql import AlertThresholds


@app.command()
def check(
    repository: Annotated[Path, typer.Argument(help="Model repository directory.")],
    target: Annotated[
        str | None,
        typer.Option(
            help="Also check that models suit cpu (the bundled server), cpu-native (Triton's CPU backends) or gpu serving."
        ),
    ] = None,
):
    """Validate a repository without loading it: schema, ensemble wiring, files, instance kinds."""
    from tritonkit.check import TARGETS, check_repository

    if target not in (None, *TARGETS):
        raise InputError(f"--target {target!r}: use {', '.join(TARGETS)}")
    report = check_repository(repository, target)
    for warning in report.warnings:
        labelled("warning:", "yellow", str(warning))
    for error in report.errors:
        labelled("error:", "red", str(error))
    print(report.summary)
    if not report.ok:
        raise typer.Exit(2)


@app.command()
def k8s(
    repository: Annotated[Path, typer.Argument(help="Model repository the manifests serve (its configs decide them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the manifests.")] = Path("k8s"),
    name: Annotated[str, typer.Option(help="Name of the Deployment, Service and everything else.")] = "tritonkit",
    namespace: Annotated[str | None, typer.Option(help="Namespace (default: kubectl's current one).")] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Server image (default: tritonkit-tritonserver:RELEASE, built from the generated Dockerfile)."
        ),
    ] = None,
    triton_release: Annotated[
        str, typer.Option(help="NGC tritonserver release the image is based on (24.10 = tritonserver 2.51).")
    ] = "24.10",
    replicas: Annotated[int, typer.Option(help="Replicas (the autoscaler's minimum).")] = 2,
    max_replicas: Annotated[int | None, typer.Option(help="The autoscaler's maximum (default 4 x --replicas).")] = None,
    gpus_per_replica: Annotated[
        int | None, typer.Option(help="GPUs per replica (default: 1 if the repository has GPU instances, else 0).")
    ] = None,
    model_store: Annotated[
        str,
        typer.Option(
            help="pvc (a ReadOnlyMany claim mounted at /models) or an s3:// gs:// as:// URL Triton reads itself."
        ),
    ] = "pvc",
    storage_size: Annotated[str, typer.Option(help="Size of the model volume claim (--model-store pvc).")] = "20Gi",
    cpu: Annotated[str, typer.Option(help="CPU request and limit per replica.")] = "4",
    memory: Annotated[
        str | None,
        typer.Option(
            help="Memory request and limit per replica (default: measured with --memory-from, else "
            "predicted by `tritonkit plan`, plus 25%)."
        ),
    ] = None,
    memory_from: Annotated[
        str | None,
        typer.Option(
            help="Size the memory from a served copy: Triton's metrics URL (host:8002) or a scripts/soak.py --json report."
        ),
    ] = None,
    shm_size: Annotated[
        str | None, typer.Option(help="/dev/shm size (default: 256Mi per Python-backend instance, at least 1Gi).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Ingress host name.")] = None,
    tls_secret: Annotated[
        str | None, typer.Option(help="TLS secret for the Ingresses (gRPC through ingress-nginx needs TLS).")
    ] = None,
    target_queue_ms: Annotated[
        float, typer.Option(help="Autoscaler target: average queue time per request, ms.")
    ] = 50.0,
    p99_alert_ms: Annotated[
        float, typer.Option(help="Alert when an ensemble's p99 latency stays above this, ms.")
    ] = AlertThresholds.p99_ms,
    error_ratio_alert: Annotated[
        float, typer.Option(help="Alert when this share of an ensemble's requests fails.")
    ] = AlertThresholds.error_ratio,
    queue_alert_ms: Annotated[
        float, typer.Option(help="Alert when a model's requests wait this long in its queue on a replica, ms.")
    ] = AlertThresholds.queue_ms,
    openai_port: Annotated[
        int | None, typer.Option(help="Add the OpenAI gateway to each pod on this port (Ingress route /v1).")
    ] = None,
    openai_cache_url: Annotated[
        str | None, typer.Option(help="The gateway's Redis embedding cache: redis://host:port/db.")
    ] = None,
    openai_redis: Annotated[bool, typer.Option(help="Also deploy a Redis for the gateway's embedding cache.")] = False,
):
    """Kubernetes manifests, alerts, autoscaling and a Grafana dashboard for serving REPOSITORY."""
    from tritonkit.k8s import K8sOptions, write_manifests

    options = K8sOptions(
        name=name,
        namespace=namespace,
        image=image,
        triton_release=triton_release,
        replicas=replicas,
        max_replicas=max_replicas,
        gpus_per_replica=gpus_per_replica,
        model_store=model_store,
        storage_size=storage_size,
        cpu=cpu,
        memory=memory,
        memory_from=memory_from,
        shm_size=shm_size,
        host=host,
        tls_secret=tls_secret,
        target_queue_ms=target_queue_ms,
        p99_alert_ms=p99_alert_ms,
        error_ratio_alert=error_ratio_alert,
        queue_alert_ms=queue_alert_ms,
        openai_port=openai_port,
        openai_cache_url=openai_cache_url,
        openai_redis=openai_redis,
    )
    written = write_manifests(repository, out, options)
    console.print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", highlight=False)


@app.command()
def plan(
    repository: Annotated[Path, typer.Argument(help="Model repository to plan for.")],
    qps: Annotated[float | None, typer.Option(help="Target requests per second (needs --bench).")] = None,
    bench: Annotated[
        Path | None, typer.Option(help="`tritonkit bench --json` result of one replica on the target hardware.")
    ] = None,
    gpu_memory_gb: Annotated[float, typer.Option(help="Memory of one GPU.")] = 24.0,
    gpu_hour_price: Annotated[float | None, typer.Option(help="Price of one GPU hour, for the monthly cost.")] = None,
    utilization: Annotated[
        float, typer.Option(help="Share of the measured throughput to plan each replica for (headroom).")
    ] = 0.7,
    max_p99_ms: Annotated[
        float | None, typer.Option(help="Only count bench levels whose p99 latency is within this.")
    ] = None,
    overhead_mb: Annotated[
        float | None,
        typer.Option(
            help="Fixed memory per instance, replacing the measured runtime of each CPU template "
            "and the 300 MB stub + CUDA context of a GPU instance."
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Requests in flight: batches hold at most their rows (default: every batch at its max size)."
        ),
    ] = None,
    measure: Annotated[
        str | None,
        typer.Option(
            help="Compare with what a served repository holds: Triton's metrics URL (host:8002), "
            "a saved /metrics page, or a scripts/soak.py --json report."
        ),
    ] = None,
    dim: Annotated[list[str] | None, typer.Option(help="Size of a symbolic graph dim, NAME=SIZE (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON.")] = None,
):
    """Memory per model instance, GPUs per replica, replicas for --qps and the monthly cost."""
    from rich.table import Table

    from tritonkit.capacity import check_memory, make_plan, measured_memory, mib

    dims = {}
    for item in dim or []:
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise InputError(f"--dim {item!r}: use NAME=SIZE, e.g. --dim PAST_KEYS_0_dim2=447")
        dims[name] = int(size)
    measurement = measured_memory(measure) if measure else None
    # compared with a measurement: planned at the batches it reached (unless --concurrency says otherwise)
    batches = measurement.batches if measurement is not None and concurrency is None else None
    result = make_plan(
        repository,
        qps=qps,
        bench=bench,
        gpu_memory_gb=gpu_memory_gb,
        gpu_hour_price=gpu_hour_price,
        utilization=utilization,
        max_p99_ms=max_p99_ms,
        overhead_mb=overhead_mb,
        dims=dims,
        concurrency=concurrency,
        batches=batches,
    )
    load = (
        f", {concurrency} requests in flight"
        if concurrency
        else ", at the batches measured"
        if batches
        else ", batches at their max size"
    )
    table = Table(title=f"memory per instance ({repository}{load})")
    for column in (
        "model",
        "instances",
        "max batch",
        "weights MiB",
        "workspace MiB",
        "overhead MiB",
        "buffers MiB",
        "per instance MiB",
        f"fit one {gpu_memory_gb:g} GB GPU",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in result.models:
        table.add_row(
            m.name,
            str(m.instances),
            str(m.max_batch_size),
            mib(m.weight_bytes),
            mib(m.workspace_bytes),
            mib(m.overhead_bytes),
            mib(m.buffer_bytes),
            mib(m.bytes_per_instance),
            str(result.instances_per_gpu.get(m.name, "-")),
        )
    Console(width=max(Console().width, 150)).print(table)
    checks = check_memory(result, measurement.sizes) if measurement is not None else []
    if checks:
        compared = Table(title=f"resident memory, predicted vs measured ({measure})")
        for column in ("model", "predicted MiB", "measured MiB", "error"):
            compared.add_column(column, justify="left" if column == "model" else "right")
        for check in checks:
            compared.add_row(check.model, mib(check.predicted_bytes), mib(check.measured_bytes), f"{check.error:+.0%}")
        predicted, measured_total = sum(c.predicted_bytes for c in checks), sum(c.measured_bytes for c in checks)
        compared.add_row(
            "all", mib(predicted), mib(measured_total), f"{(predicted - measured_total) / measured_total:+.0%}"
        )
        Console(width=max(Console().width, 150)).print(compared)
    lines = [
        f"one replica: {mib(result.replica_bytes)} MiB -> {result.gpus_per_replica} GPU(s) of {gpu_memory_gb:g} GB",
        f"host memory of one replica (tritonserver, its CPU models, the stubs of its GPU models): {mib(result.host_bytes)} MiB",
    ]
    if result.throughput:
        t = result.throughput
        lines.append(
            f"measured: {t.model} {t.requests_per_s:.1f} req/s per replica (concurrency {t.concurrency}, p99 {t.p99_ms:.0f} ms)"
        )
    if result.replicas:
        lines.append(f"replicas for {result.qps:g} req/s at {result.utilization:.0%} utilisation: {result.replicas}")
    if result.monthly_cost is not None:
        lines.append(
            f"monthly cost: {result.replicas} x {result.gpus_per_replica} GPU x {result.gpu_hour_price:g}/h x 730 h "
            f"= {result.monthly_cost:,.2f}"
        )
    for line in lines:
        print(line)
    for note in result.notes:
        labelled("note:", "yellow", str(note))
    if json_out:
        data = result.to_json()
        if checks:
            data["measured"] = [{**asdict(c), "error": c.error} for c in checks]
        json_out.write_text(json.dumps(data, indent=2) + "\n")
