"""Commands that serve a repository: serve (tritonserver, supervised) and openai (the HTTP gateway)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from tritonkit.cli.common import (
    GrpcPort,
    Host,
    HttpPort,
    MetricsPort,
    app,
)
from tritonkit.errors import InputError, TritonkitError
from tritonkit.termination import DRAIN_S, GATEWAY_GRACE_S, TRITON_PRESTOP_S


@app.command()
def serve(
    repository: Annotated[Path, typer.Argument(help="Model repository directory.")] = Path("model_repository"),
    host: Host = "127.0.0.1",
    grpc_port: GrpcPort = 8001,
    http_port: HttpPort = 8000,
    metrics_port: MetricsPort = 8002,
    log_file: Annotated[Path | None, typer.Option(help="Where tritonserver's log goes.")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for all models to load.")] = 600,
    cache_mb: Annotated[
        int, typer.Option(help="Response cache size in MiB (embedding ensembles use it); 0 turns it off.")
    ] = 256,
    supervise: Annotated[
        bool, typer.Option(help="Restart tritonserver when it dies or a Python-backend process does (Triton does not).")
    ] = True,
    max_restarts: Annotated[
        int, typer.Option(help="Crash loop: give up after more than this many restarts within --restart-window.")
    ] = 5,
    restart_window: Annotated[float, typer.Option(help="Seconds over which --max-restarts counts crashes.")] = 300,
    openai_port: Annotated[
        int | None, typer.Option(help="Also serve the OpenAI API on this port (see `tritonkit openai`).")
    ] = None,
    allocator: Annotated[
        str,
        typer.Option(
            help="Memory allocator preloaded into tritonserver and its Python-backend stubs: auto (jemalloc, "
            "else tcmalloc, else glibc's), jemalloc, tcmalloc or glibc. glibc's keeps freed memory, so a "
            "long-running server's memory creeps up (docs/RELIABILITY.md)."
        ),
    ] = "auto",
):
    """Run tritonserver on a repository in the foreground; Ctrl-C stops it."""
    from tritonkit.repository import list_models
    from tritonkit.server import TritonServer

    server = TritonServer(
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_file=log_file,
        response_cache_bytes=max(cache_mb, 0) * 1024 * 1024,
        allocator=allocator,
    )
    stopping: list[int] = []
    gateways: list[subprocess.Popen] = []

    def forward(signum, _frame):
        """A pod's termination (tritonkit.termination): the gateway drains first, and tritonserver
        stops once the gateway no longer accepts requests."""
        stopping.append(signum)
        if not gateways or len(stopping) > 1:
            server.terminate()
            return
        gateways[0].send_signal(signal.SIGTERM)
        later = threading.Timer(TRITON_PRESTOP_S, server.terminate)
        later.daemon = True
        later.start()

    server.start()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        server.wait_until_ready(ready_timeout)
    except TritonkitError:
        server.stop()
        if stopping:
            raise typer.Exit(0) from None
        raise
    models = list_models(repository)
    if openai_port is not None:  # beside the server, on the same host; it reconnects across restarts
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tritonkit.cli",
                "openai",
                "--triton",
                server.grpc_url,
                "--host",
                host,
                "--port",
                str(openai_port),
            ],
            stdout=subprocess.DEVNULL,
        )
        gateways.append(gateway)
    print(
        f"tritonkit: ready: {len(models)} models on grpc {server.grpc_url}, http {server.http_url}, "
        f"metrics {server.metrics_url} (log: {server.log_file})"
        + (f", OpenAI API http://{host}:{openai_port}/v1" if openai_port is not None else ""),
        flush=True,
    )
    try:
        code = server.serve_forever(
            supervise,
            stopping=lambda: bool(stopping),
            report=lambda message: print(f"tritonkit: {message}", flush=True),
            ready_timeout=ready_timeout,
            max_restarts=max_restarts,
            restart_window_s=restart_window,
        )
    finally:
        for gateway in gateways:  # draining already after a SIGTERM; told now after a crash loop
            gateway.terminate()
            try:
                gateway.wait(timeout=DRAIN_S + GATEWAY_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                gateway.kill()
    server.stop()
    if stopping:
        raise typer.Exit(0)
    errors = "\n".join(server.error_lines()[-20:])
    raise TritonkitError(f"tritonserver exited with code {code}:\n{errors}", log_path=str(server.log_file))


@app.command("openai")
def openai_gateway(
    triton: Annotated[str, typer.Option(help="The tritonserver's gRPC address.")] = "127.0.0.1:8001",
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the API.")] = 9000,
    api_key: Annotated[
        str | None, typer.Option(envvar="TRITONKIT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/.")
    ] = None,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body (413 above it).")] = 100,
    cache_url: Annotated[
        str | None, typer.Option(help="Cache embeddings in Redis, shared by replicas: redis://host:port/db.")
    ] = None,
    cache_ttl: Annotated[int, typer.Option(help="Seconds an embedding stays in the Redis cache.")] = 3600,
    allow_url_fetch: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs (public addresses only, limited, no file:).")
    ] = False,
    url_fetch_host: Annotated[
        list[str] | None,
        typer.Option(help="A host fetched even though its address is private (an internal image store); repeatable."),
    ] = None,
    max_fetch_mb: Annotated[int, typer.Option(help="Largest fetched image.")] = 20,
    fetch_timeout: Annotated[float, typer.Option(help="Seconds a fetch may take, redirects included.")] = 10.0,
    max_live_sessions: Annotated[
        int, typer.Option(help="Realtime API: live transcription sessions at once (one more is refused).")
    ] = 32,
    max_session_minutes: Annotated[float, typer.Option(help="Realtime API: the audio one session may send.")] = 60.0,
    drain_seconds: Annotated[
        float,
        typer.Option(
            help="On SIGTERM: /health answers 503 this long while requests are still served (0: stop at once)."
        ),
    ] = DRAIN_S,
    grace_seconds: Annotated[
        float, typer.Option(help="Then: how long accepted requests (streams included) may take to finish.")
    ] = GATEWAY_GRACE_S,
):
    """Serve the OpenAI API (embeddings, chat with images, audio) in front of a running tritonserver.

    Example: tritonkit openai --triton 127.0.0.1:8001 --port 9000, then
    curl http://127.0.0.1:9000/v1/embeddings -d '{"model": "clip", "input": "a photo of a cat"}'
    """
    from tritonkit.gateway import GatewayOptions, run_gateway
    from tritonkit.gateway.fetch import FetchPolicy
    from tritonkit.gateway.realtime import RealtimeLimits

    if max_fetch_mb < 1 or fetch_timeout <= 0:
        raise InputError("--max-fetch-mb must be >= 1 and --fetch-timeout > 0")
    if url_fetch_host and not allow_url_fetch:
        raise InputError("--url-fetch-host needs --allow-url-fetch")
    if max_body_mb < 1:
        raise InputError(f"--max-body-mb must be >= 1, got {max_body_mb}")
    if max_live_sessions < 1 or max_session_minutes <= 0:
        raise InputError("--max-live-sessions must be >= 1 and --max-session-minutes > 0")
    if cache_ttl < 1:
        raise InputError(f"--cache-ttl must be >= 1 s, got {cache_ttl}")
    if drain_seconds < 0 or grace_seconds < 1:
        raise InputError("--drain-seconds must be >= 0 and --grace-seconds >= 1")
    options = GatewayOptions(
        triton_url=triton,
        api_key=api_key,
        max_body_bytes=max_body_mb * 1024 * 1024,
        cache_url=cache_url,
        cache_ttl_s=cache_ttl,
        fetch=FetchPolicy(
            enabled=allow_url_fetch,
            max_bytes=max_fetch_mb * 1024 * 1024,
            timeout_s=fetch_timeout,
            allowed_hosts=frozenset(url_fetch_host or ()),
        ),
        realtime_limits=RealtimeLimits(max_sessions=max_live_sessions, max_session_s=max_session_minutes * 60),
        drain_s=drain_seconds,
        grace_s=grace_seconds,
    )
    print(f"tritonkit: OpenAI API on http://{host}:{port}/v1 in front of {triton}", flush=True)
    run_gateway(options, host=host, port=port)
