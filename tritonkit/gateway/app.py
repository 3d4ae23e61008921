"""The OpenAI-compatible HTTP API in front of a Triton server that serves tritonkit ensembles.

An ASGI app (FastAPI); every request becomes gRPC requests on one shared asynchronous channel, so
concurrent HTTP requests reach Triton together and its dynamic batcher merges them. Errors use
OpenAI's envelope; a request's bad input is a 400 carrying the served model's own message. The
endpoints are routers by group (tritonkit.gateway.routes); this module assembles them with what
every request passes through: the body limit, the API key, the metrics and the error envelope.
"""

import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritonkit.gateway.context import Gateway, GatewayOptions
from tritonkit.gateway.draining import DrainingServer, GraceDeadline, uvicorn_grace_s
from tritonkit.gateway.routes import ROUTERS
from tritonkit.gateway.triton import ApiError


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def on_api_error(_request, exc: ApiError):
    return error_response(exc)


async def on_http_error(_request, exc: StarletteHTTPException):
    return error_response(ApiError(exc.status_code, str(exc.detail)))


async def on_validation_error(_request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return error_response(ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param))


def create_app(options: GatewayOptions) -> FastAPI:
    gateway = Gateway(options)

    @asynccontextmanager
    async def lifespan(_app):
        await gateway.open()
        yield
        await gateway.close()

    app = FastAPI(title="tritonkit OpenAI-compatible API", lifespan=lifespan)
    app.state.gateway = gateway
    app.exception_handler(ApiError)(on_api_error)
    app.exception_handler(StarletteHTTPException)(on_http_error)
    app.exception_handler(RequestValidationError)(on_validation_error)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The body limit and the API key before any endpoint; every /v1/ request counted."""
        began = time.perf_counter()
        endpoint = request.url.path
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > options.max_body_bytes:
            message = (
                f"the request body ({length} bytes) exceeds the {options.max_body_bytes} byte limit (--max-body-mb)"
            )
            response = error_response(ApiError(413, message, code="request_too_large"))
        elif endpoint.startswith("/v1/") and not gateway.authorized(request.headers.get("authorization")):
            response = error_response(
                ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
            )
        else:
            response = await call_next(request)
        if endpoint.startswith("/v1/"):
            metrics = gateway.metrics
            metrics.latency.labels(endpoint).observe(time.perf_counter() - began)
            metrics.request_bytes.labels(endpoint).observe(length)
            model = getattr(request.state, "model", "")
            metrics.requests_total.labels(endpoint, model, str(response.status_code)).inc()
        return response

    for router in ROUTERS:
        app.include_router(router)
    return app


def spawn_gateway(triton_url: str, *options: str, timeout_s: float = 60):
    """`tritonkit openai` in front of `triton_url` as a child process (scripts, tests): the process
    and its base URL, once /health answers. It stops at once on SIGTERM (no balancer to drain
    from) unless `options` ask for a drain."""
    import subprocess
    import sys
    import urllib.request

    from tritonkit.errors import TritonkitError
    from tritonkit.server import free_port

    port = free_port()
    drain = () if "--drain-seconds" in options else ("--drain-seconds", "0")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tritonkit.cli",
            "openai",
            "--triton",
            triton_url,
            "--port",
            str(port),
            *drain,
            *options,
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return process, base
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise TritonkitError(f"the gateway in front of {triton_url} did not become healthy") from None
            time.sleep(0.2)


def run_gateway(options: GatewayOptions, host: str = "127.0.0.1", port: int = 9000) -> None:
    app = create_app(options)
    config = uvicorn.Config(
        GraceDeadline(app, app.state.gateway),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=uvicorn_grace_s(options.grace_s),
    )
    DrainingServer(config, app.state.gateway).run()
