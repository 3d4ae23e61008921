"""Remote images (`http(s)://` URLs in chat and image embeddings), fetched only when the gateway is
told to (`--allow-url-fetch`): a byte limit, a deadline, and no address that is private, loopback,
link-local or otherwise not public — the first hop and every redirect are checked — unless its
host is named in `--url-fetch-host` (an internal image store). `file:` URLs are never read.

The check resolves the host before connecting; a DNS answer that changes between the check and
the connection (rebinding) is not caught here: put the gateway behind an egress policy as well if
that matters to you."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from tritonkit.gateway.triton import ApiError

DEFAULT_MAX_FETCH_MB = 20
DEFAULT_FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool = False
    max_bytes: int = DEFAULT_MAX_FETCH_MB * 1024 * 1024
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # fetched even when not public


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _check_host(url: str, policy: FetchPolicy, param: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{param}: only http(s) URLs are fetched, got {parts.scheme or 'no'} scheme", param=param)
    host = parts.hostname
    if host in policy.allowed_hosts:
        return
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        raise ApiError(400, f"{param}: the host {host!r} does not resolve", param=param) from None
    if not answers or not all(_public(str(a[4][0])) for a in answers):
        raise ApiError(
            400,
            f"{param}: {host!r} is a private or loopback address; such URLs are not fetched "
            "(name the host with --url-fetch-host to allow it)",
            param=param,
            code="invalid_value",
        )


async def fetch(url: str, policy: FetchPolicy, param: str) -> bytes:
    """The body of `url` under `policy`; every refusal is a 400 naming `param`."""
    import httpx

    if not policy.enabled:
        raise ApiError(
            400,
            f"{param}: remote URLs are not fetched by this gateway (start it with --allow-url-fetch), "
            "or send the image as a data:image/...;base64, URL",
            param=param,
            code="invalid_value",
        )

    async def download() -> bytes:
        current = url
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                await _check_host(current, policy, param)
                async with client.stream("GET", current) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ApiError(400, f"{param}: the image URL answered HTTP {response.status_code}", param=param)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > policy.max_bytes:
                            raise ApiError(
                                400,
                                f"{param}: the image is larger than {policy.max_bytes} bytes (--max-fetch-mb)",
                                param=param,
                            )
                    return bytes(body)
        raise ApiError(400, f"{param}: more than {MAX_REDIRECTS} redirects", param=param)

    try:
        return await asyncio.wait_for(download(), policy.timeout_s)
    except TimeoutError:
        raise ApiError(
            400, f"{param}: the image URL did not answer within {policy.timeout_s:g} s", param=param
        ) from None
    except httpx.HTTPError as exc:
        raise ApiError(400, f"{param}: the image could not be fetched ({type(exc).__name__})", param=param) from None
