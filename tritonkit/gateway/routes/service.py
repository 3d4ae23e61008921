"""The gateway's own endpoints: health, Prometheus metrics, and the served models."""

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import generate_latest

from tritonkit.gateway.context import gateway_of
from tritonkit.gateway.triton import ApiError, ServedModel

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    gateway = gateway_of(request)
    if gateway.draining:
        raise ApiError(503, "this replica is shutting down (draining); retry on another", code="draining")
    if not await gateway.triton.ready():
        raise ApiError(503, f"the inference server at {gateway.options.triton_url} is not ready", code="unavailable")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(gateway_of(request).metrics.registry), media_type="text/plain; version=0.0.4")


def model_object(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": "tritonkit", "kind": m.kind}


@router.get("/v1/models")
async def models(request: Request):
    served = await gateway_of(request).triton.models(refresh=True)
    return {"object": "list", "data": [model_object(m) for m in sorted(served.values(), key=lambda m: m.name)]}


@router.get("/v1/models/{name}")
async def retrieve_model(name: str, request: Request):
    served = await gateway_of(request).triton.models(refresh=True)
    if name not in served:
        known = ", ".join(sorted(served)) or "none"
        raise ApiError(404, f"model {name!r} is not served (served: {known})", param="model", code="model_not_found")
    return model_object(served[name])
