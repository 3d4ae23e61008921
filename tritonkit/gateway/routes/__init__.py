"""The gateway's endpoints, one router per group of OpenAI's API."""

from tritonkit.gateway.routes import audio, chat, embeddings, realtime, service

ROUTERS = (service.router, embeddings.router, chat.router, audio.router, realtime.router)
