"""The gateway's side of Triton: one asynchronous gRPC channel, the served models found on the
server, and Triton's errors turned into OpenAI's (`ApiError`)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from tritonkit.chat_loop import BUSY_MARK
from tritonkit.contracts import CONTRACTS
from tritonkit.dtypes import wire_datatype
from tritonkit.repository_format import FORMAT_PARAMETER, format_error

# A composing model's message as an ensemble passes it on: "in ensemble 'clip_image', IMAGE: ..."
RETRY_AFTER_S = 1  # what a 429 asks a client to wait: a decoder's queue moves on within a second or two
_ENSEMBLE_PREFIX = re.compile(r"^(?:in ensemble '[^']*', )+")
# A served model's message names the tensor it refuses ("TEMPERATURE: must be ..."): the request
# field that became that tensor is the error's `param`.
TENSOR_PARAMS = {
    "MAX_NEW_TOKENS": "max_tokens",
    "TEMPERATURE": "temperature",
    "TOP_P": "top_p",
    "SEED": "seed",
    "STOP": "stop",
    "TOP_LOGPROBS": "top_logprobs",
    "RESPONSE_FORMAT": "response_format",
}


class ApiError(Exception):
    """An error answered in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "requests",
            503: "service_unavailable",
        }.get(self.status, "server_error")

    @property
    def headers(self) -> dict[str, str]:
        """A busy server says when to come back (Retry-After, in seconds)."""
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """One OpenAI `model`: the build's --name, and the ensembles that serve it by role."""

    name: str
    kind: str  # "embeddings", "transcription" or "chat"
    # role -> ensemble: image, text (embeddings); speech; chat, stream, and text, text_stream (chat without images)
    ensembles: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None  # the text tokenizer model (token counts for `usage`)
    inputs: set[str] = field(default_factory=set)  # the ensembles' input names (optional ones tell what a build can do)
    vad: str | None = None  # transcription: the build's Silero VAD model (the Realtime API's server VAD)
    stale: str | None = None  # why it cannot be served: written in another repository format


def classify(configs: Mapping[str, dict], names: set[str]) -> dict[str, ServedModel]:
    """The OpenAI models a repository serves, from its ensembles' configs (as JSON), by the
    contracts' roles (tritonkit.contracts)."""
    ensembles = {name: config for name, config in sorted(configs.items()) if config.get("platform") == "ensemble"}
    models: dict[str, ServedModel] = {}
    for ensemble, config in ensembles.items():
        inputs = {i["name"] for i in config.get("input", [])}
        outputs = {o["name"] for o in config.get("output", [])}
        for contract, role in ((c, r) for c in CONTRACTS for r in c.roles):
            name = role.plays(ensemble, inputs, outputs, ensembles)
            if name is None:
                continue
            model = models.setdefault(name, ServedModel(name, contract.kind))
            model.ensembles[role.name] = ensemble
            model.inputs |= inputs
            if role.companion is not None and ensemble + role.companion[1] in names:
                setattr(model, role.companion[0], ensemble + role.companion[1])
            found = config.get("parameters", {}).get(FORMAT_PARAMETER, {}).get("string_value")
            stale = format_error(f"model {name!r}", found)
            if stale is not None:
                model.stale = str(stale)
            break
    return models


def _tensors(grpc, inputs: Mapping[str, np.ndarray]) -> list:
    tensors = []
    for name, array in inputs.items():
        tensors.append(grpc.InferInput(name, list(array.shape), wire_datatype(array)))
        tensors[-1].set_data_from_numpy(array)
    return tensors


def api_error(exc: Exception, param: str | None = None) -> ApiError:
    """Triton's error as the OpenAI error a client should see: its own input -> 400 with the
    model's message; the server unreachable or not ready -> 503; anything else -> 500."""
    status_of = getattr(exc, "status", None)
    status = status_of() if callable(status_of) else None
    message_of = getattr(exc, "message", None)
    message = (message_of() if callable(message_of) else None) or str(exc)
    message = _ENSEMBLE_PREFIX.sub("", message.strip())
    if status == "StatusCode.INVALID_ARGUMENT":
        param = TENSOR_PARAMS.get(message.split(":", 1)[0].strip(), param)
        return ApiError(400, message, param=param, code="invalid_value")
    if (
        BUSY_MARK in message
    ):  # a decoder's queue is full (tritonkit.chat_loop.QueueFull); also on streams, which carry no status
        return ApiError(429, message, code="rate_limit_exceeded")
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") or "failed to connect" in message:
        return ApiError(503, f"the inference server is not available: {message}", code="unavailable")
    if status == "StatusCode.NOT_FOUND" or "unknown model" in message.lower():
        return ApiError(503, f"the inference server does not serve that model now: {message}", code="unavailable")
    return ApiError(500, f"the inference server failed: {message}", code="internal_error")


class Triton:
    """One `tritonclient.grpc.aio` channel shared by every request of the gateway process."""

    def __init__(self, url: str, timeout_s: float = 300):
        import tritonclient.grpc.aio as grpc

        self.url = url
        self.timeout_s = timeout_s
        self.grpc = grpc
        self.client = grpc.InferenceServerClient(url)
        self._models: dict[str, ServedModel] | None = None

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=2))
        except Exception:
            return False

    async def models(self, refresh: bool = False) -> dict[str, ServedModel]:
        """The served OpenAI models (asked of the server once; `refresh` asks again)."""
        if self._models is None or refresh:
            try:
                index = await self.client.get_model_repository_index(as_json=True, client_timeout=10)
                names = {m["name"] for m in index.get("models", []) if m.get("state", "READY") == "READY"}
                configs = {}
                for name in names:
                    configs[name] = (await self.client.get_model_config(name, as_json=True, client_timeout=10))[
                        "config"
                    ]
            except Exception as exc:
                raise api_error(exc) from None
            self._models = classify(configs, names)
        return self._models

    async def model(self, name: object, kind: str) -> ServedModel:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model: required, a string naming a served model", param="model")
        models = await self.models()
        if name not in models:
            models = await self.models(refresh=True)
        if name not in models or models[name].kind != kind:
            served = ", ".join(sorted(m.name for m in models.values() if m.kind == kind)) or "none"
            raise ApiError(
                404,
                f"model {name!r} is not a served {kind} model (served: {served})",
                param="model",
                code="model_not_found",
            )
        stale = models[name].stale
        if stale:
            raise ApiError(400, stale, param="model")
        return models[name]

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], param: str | None = None) -> dict:
        """One request; arrays carry their batch dimension. Errors come back as ApiError."""
        try:
            result = await self.client.infer(model, _tensors(self.grpc, inputs), client_timeout=self.timeout_s)
        except Exception as exc:
            raise api_error(exc, param) from None
        response = result.get_response(as_json=True)
        return {o["name"]: result.as_numpy(o["name"]) for o in response.get("outputs", [])}

    async def stream(
        self, model: str, inputs: Mapping[str, np.ndarray], param: str | None = None
    ) -> AsyncIterator[dict]:
        """The responses of one request to a decoupled model, until its final one."""
        tensors = _tensors(self.grpc, inputs)

        async def requests():
            yield {"model_name": model, "inputs": tensors, "enable_empty_final_response": True}

        try:
            async for result, error in self.client.stream_infer(requests(), stream_timeout=self.timeout_s):
                if error is not None:
                    raise api_error(error, param)
                response = result.get_response(as_json=True)
                outputs = {o["name"]: result.as_numpy(o["name"]) for o in response.get("outputs", [])}
                final = response.get("parameters", {}).get("triton_final_response", {}).get("bool_param", False)
                if outputs:
                    yield outputs
                if final:
                    return
        except ApiError:
            raise
        except Exception as exc:
            raise api_error(exc, param) from None
