"""An OpenAI-compatible HTTP API in front of tritonkit's ensembles (`tritonkit openai`)."""

from tritonkit.gateway.app import create_app, run_gateway, spawn_gateway
from tritonkit.gateway.context import GatewayOptions

__all__ = ["GatewayOptions", "create_app", "run_gateway", "spawn_gateway"]
