"""How the gateway stops without losing a request (tritonkit.termination gives the figures).

The first SIGTERM (or SIGINT) starts a drain: /health answers 503 for `drain_s` so that the
balancer takes the replica out, while every request that still arrives is served. Then uvicorn
stops accepting and the requests it accepted get `grace_s` to finish. One still running when the
grace period ends is answered, not cut: a 503 `shutting_down` error in OpenAI's envelope if its
answer has not started, an error event if it is a stream (then the stream ends), so that a client
knows to send it again. A second signal stops the gateway at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading

import uvicorn

from tritonkit.gateway.context import Gateway
from tritonkit.gateway.triton import ApiError
from tritonkit.gateway.wire import server_sent_event

LOGGER = logging.getLogger("tritonkit.gateway")
# uvicorn's own deadline comes this long after the gateway's, so that the gateway answers first
UVICORN_MARGIN_S = 2


class DrainingServer(uvicorn.Server):
    """uvicorn with the drain and grace period above."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway):
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit or (self.gateway.draining and self.gateway.options.drain_s > 0):
            super().handle_exit(sig, frame)  # a second signal: at once
            return
        self.gateway.draining = True
        if self.gateway.options.drain_s <= 0:
            self._stop_accepting(sig, frame)
            return
        timer = threading.Timer(self.gateway.options.drain_s, self._stop_accepting, (sig, frame))
        timer.daemon = True
        timer.start()

    def _stop_accepting(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        timer = threading.Timer(self.gateway.options.grace_s, self.gateway.end_grace)
        timer.daemon = True
        timer.start()


def uvicorn_grace_s(grace_s: float) -> int:
    return int(grace_s + 0.999) + UVICORN_MARGIN_S


class GraceDeadline:
    """ASGI middleware: a request still running when the grace period ends gets a clear error."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer: dict[str, object] = {"status": None, "stream": False}

        async def watched_send(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                answer["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)

        request = asyncio.ensure_future(self.app(scope, receive, watched_send))
        over = asyncio.ensure_future(self.gateway.grace_over().wait())
        try:
            await asyncio.wait({request, over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            over.cancel()
        if request.done():
            request.result()
            return
        request.cancel()  # its Triton call is cancelled with it, which frees the decoder's row
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(request, timeout=1)
        self.gateway.metrics.cut_at_shutdown.inc()
        LOGGER.warning(
            "%s %s still running when the grace period ended: answered 503 shutting_down",
            scope.get("method"),
            scope.get("path"),
        )
        error = ApiError(
            503,
            f"the replica shut down before this request finished (its {self.gateway.options.grace_s:g} s grace "
            "period ended); send it again: another replica will answer",
            code="shutting_down",
        )
        if answer["status"] is None:
            body = json.dumps(error.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif answer["stream"]:
            event = server_sent_event(error.body()).encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b""})
