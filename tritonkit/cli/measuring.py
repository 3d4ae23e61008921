"""Commands that measure a served repository: tune and bench."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tritonkit.cli.common import (
    Url,
    app,
    console,
    int_list,
    labelled,
    request_items,
)
from tritonkit.errors import InputError


@app.command()
def tune(
    repository: Annotated[
        Path, typer.Argument(help="Model repository directory (its best configuration is written back).")
    ],
    model: Annotated[str, typer.Argument(help="Ensemble to load, e.g. clip_image or whisper.")],
    input: Annotated[
        list[Path] | None, typer.Option("--input", "-i", help="Files to send (images, audio); repeat the flag.")
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Texts to send to a text ensemble; repeat the flag.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="The composing model to tune (default: where a first measurement finds the time)."),
    ] = None,
    p99_ms: Annotated[
        float | None, typer.Option(help="Keep only configurations whose p99 latency is at most this.")
    ] = None,
    instances: Annotated[str, typer.Option(help="Instance counts to try, comma-separated.")] = "1,2",
    max_batch_sizes: Annotated[str, typer.Option(help="Max batch sizes to try.")] = "8,16,32",
    preferred: Annotated[
        str, typer.Option(help="Try the max batch size as preferred batch size: no, yes or both.")
    ] = "no",
    queue_delays_us: Annotated[
        str, typer.Option(help="Dynamic batcher queue delays to try (microseconds).")
    ] = "0,2000",
    threads: Annotated[str, typer.Option(help="Threads per instance to try (0: the engine's default).")] = "0",
    concurrency: Annotated[int, typer.Option(help="Concurrent requests while measuring.")] = 8,
    duration: Annotated[float, typer.Option(help="Seconds per configuration.")] = 10.0,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for tune.md, tune.json and tune.png (default REPOSITORY-tune beside it)."),
    ] = None,
):
    """Search a stage's batching, instances and threads (as Model Analyzer does), measured with bench.

    Example: tritonkit tune model_repository clip_image -i cat.jpg -i dog.png --p99-ms 500
    """
    from tritonkit.tune import grid, table, write_results
    from tritonkit.tune import tune as run_tune

    items = request_items(input, text)
    choices = {"no": (False,), "yes": (True,), "both": (False, True)}
    if preferred not in choices:
        raise InputError(f"--preferred {preferred!r}: use no, yes or both")
    points = grid(
        int_list(instances) or (1,),
        int_list(max_batch_sizes) or (8,),
        choices[preferred],
        int_list(queue_delays_us) or (0,),
        int_list(threads) or (0,),
    )
    stage_tuned, results, best = run_tune(
        repository,
        model,
        items,
        points,
        stage=stage,
        p99_ms=p99_ms,
        concurrency=concurrency,
        duration_s=duration,
        progress=lambda message: console.print(message, highlight=False, markup=False),
    )
    folder = out or Path(repository).resolve().with_name(Path(repository).resolve().name + "-tune")
    write_results(results, best, stage_tuned, folder, p99_ms)
    print(table(results, best))
    if best is None:
        labelled(
            "error:",
            "red",
            f"no configuration of {stage_tuned} kept p99 within {p99_ms:g} ms; the repository is unchanged",
        )
        raise typer.Exit(2)
    console.print(
        f"[green]wrote[/green] {best.point.label()} ({best.throughput:.1f} req/s, p99 {best.p99_ms:.0f} ms) "
        f"to {Path(repository) / stage_tuned / 'config.pbtxt'}; table and plot in {folder}"
    )


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Model or ensemble to load, e.g. clip_image, clip_text, whisper.")],
    input: Annotated[
        list[Path] | None, typer.Option("--input", "-i", help="Files to send (images, audio); repeat the flag.")
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Texts to send to a text model; repeat the flag.")] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,4,16",
    duration: Annotated[float | None, typer.Option(help="Seconds per level (default 10 unless --requests).")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests per level instead of a duration.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of throughput against p99 latency.")] = None,
    timeout: Annotated[float, typer.Option(help="Client timeout per request, seconds.")] = 60,
    perf_analyzer: Annotated[
        bool, typer.Option("--perf-analyzer", help="Run perf_analyzer (if on PATH) with the same settings instead.")
    ] = False,
    openai: Annotated[
        str | None,
        typer.Option(help="Drive the OpenAI gateway at this URL instead (MODEL is then its model, e.g. clip)."),
    ] = None,
    allow_cache: Annotated[
        bool, typer.Option(help="Send the inputs as they are, so Triton's response cache may answer repeats.")
    ] = False,
    url: Url = "127.0.0.1:8001",
):
    """Load a served model with concurrent requests and report throughput, latency and where time goes.

    Every request's bytes are made unique (harmless padding) so caches do not answer in place of the
    models; --allow-cache sends them as they are.

    Example: tritonkit bench clip_image -i cat.jpg -i dog.png --concurrency 1,4,16 --duration 10 --json r.json --plot r.png
    Through the gateway: tritonkit bench clip --openai http://127.0.0.1:9000 -i cat.jpg
    """
    import tempfile

    from rich.progress import Progress
    from rich.table import Table

    from tritonkit import bench as load

    items = request_items(input, text)
    levels = int_list(concurrency) or (1,)
    if duration is None and requests is None:
        duration = 10.0
    if perf_analyzer:
        import tritonclient.grpc as grpcclient

        config = grpcclient.InferenceServerClient(url).get_model_config(model, as_json=True)["config"]
        data = load.perf_analyzer_input(config, items, Path(tempfile.mkdtemp()) / "input.json")
        raise typer.Exit(load.run_perf_analyzer(load.perf_analyzer_command(url, model, data, levels, duration)))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        started: dict[str, float] = {}

        def progress(label: str, fraction: float) -> None:
            began = started.setdefault(label, time.monotonic())
            done = fraction if requests or not duration else min((time.monotonic() - began) / duration, 1.0)
            bar.update(task, description=label, completed=done)

        results = load.run_bench(
            url,
            model,
            items,
            levels,
            duration_s=None if requests else duration,
            requests=requests,
            timeout_s=timeout,
            progress=progress,
            allow_cache=allow_cache,
            openai=openai,
            texts=[False] * (len(items) - len(text or [])) + [True] * len(text or []),
        )
    table = Table(title=f"{model} at {openai or url}")
    for column in ("conc.", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "timeouts", "client CPU"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            f"{r.throughput:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            f"{r.p99_ms:.1f}",
            str(r.errors),
            str(r.timeouts),
            f"{r.client_cpu_share:.0%}",
        )
    console.print(table)
    for r in results:
        if not r.models:
            continue
        breakdown = Table(title=f"server ms per request at concurrency {r.concurrency}")
        for column in ("model", "req", "queue", "in", "infer", "out", "cached", "batches"):
            breakdown.add_column(column, justify="right" if column != "model" else "left", overflow="fold")
        for name, m in r.models.items():
            sizes = " ".join(f"{b}x{n}" for b, n in m.batch_sizes.items())
            breakdown.add_row(
                name,
                str(m.requests),
                f"{m.queue_ms:.2f}",
                f"{m.compute_input_ms:.2f}",
                f"{m.compute_infer_ms:.2f}",
                f"{m.compute_output_ms:.2f}",
                str(m.cache_hits),
                sizes,
            )
        console.print(breakdown)
        cached = max((m.cache_hits for m in r.models.values()), default=0)
        if cached:
            labelled(
                "note:",
                "yellow",
                f"Triton's response cache answered {cached} of {r.requests} requests at concurrency {r.concurrency}"
                + ("" if allow_cache else " (identical inputs from another client)")
                + "; these figures include cache hits",
            )
    for r in results:
        if r.first_error:
            labelled("first error:", "red", str(r.first_error))
    if json_out:
        meta = {"model": model, "url": openai or url, "inputs": len(items), "unique_inputs": not allow_cache}
        load.write_json(results, json_out, meta)
    if plot:
        load.write_plot(results, plot, f"{model}: throughput vs p99")
