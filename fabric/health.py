"""``/healthz``, ``/readyz`` and ``/metrics`` of a worker process (the router serves them in its HTTP API).

A tiny ASGI application (Starlette's request and response) served by :class:`~fabric.asgi.AsgiServer`,
uvicorn inside the worker's own event loop: it keeps answering while the process is busy and costs
nothing between requests. ``/healthz`` says the process (its event loop) is alive; ``/readyz`` runs the
process's readiness checks (broker connected, consumers active) and answers 503 with the failing check.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Self

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fabric.asgi import AsgiServer
from fabric.errors import ConfigError

log = logging.getLogger("fabric.health")

#: A readiness check: returns None when ready, else a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
#: Renders the Prometheus text exposition.
MetricsRenderer = Callable[[], str]


class HealthServer:
    """Serves the health endpoints on ``host:port``. Use as ``async with HealthServer(...)``.

    Args:
        checks: readiness checks by name.
        metrics: renders ``/metrics`` (Prometheus text format).
        port: 0 picks a free port (see :attr:`port` after start).

    Raises:
        ConfigError: on entry, when the port cannot be listened on.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        checks: dict[str, ReadinessCheck],
        metrics: MetricsRenderer | None = None,
    ) -> None:
        self._checks = checks
        self._metrics = metrics
        self._server = AsgiServer(self._asgi, host, port)

    @property
    def port(self) -> int:
        return self._server.port

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        log.info("health endpoints on http://%s:%d/healthz", self._server.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.__aexit__(*exc)

    async def readiness(self) -> dict[str, str]:
        """Run every check; map of check name to "ok" or the reason it fails."""
        return await run_checks(self._checks)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # a websocket is turned away by uvicorn (403); lifespan events are off
        request = Request(scope, receive)
        status, content_type, body = await self._route(request.method, request.url.path)
        # The content type exactly as given (Starlette would add a charset to text/plain).
        response = Response(body, status, headers={"content-type": content_type})
        await response(scope, receive, send)

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}\n'
        if path == "/readyz":
            results = await self.readiness()
            ready = all(v == "ok" for v in results.values())
            doc = {"status": "ready" if ready else "unready", "checks": results}
            return (200 if ready else 503), "application/json", json.dumps(doc).encode() + b"\n"
        if path == "/metrics" and self._metrics is not None:
            return 200, METRICS_CONTENT_TYPE, self._metrics().encode()
        return 404, "text/plain", b"not found\n"


async def run_checks(checks: dict[str, ReadinessCheck]) -> dict[str, str]:
    """Run readiness checks (5 s each at most); map of check name to "ok" or the reason it fails."""
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            reason = await asyncio.wait_for(check(), 5)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        results[name] = reason or "ok"
    return results


#: Content type of the Prometheus text exposition format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def serve_health(
    host: str, port: int, *, checks: dict[str, ReadinessCheck], metrics: MetricsRenderer, fallback: bool
) -> HealthServer:
    """Start a :class:`HealthServer`; with ``fallback``, a busy port falls back to any free one."""
    try:
        return await HealthServer(host, port, checks=checks, metrics=metrics).__aenter__()
    except ConfigError:
        if not fallback or port == 0:
            raise
        server = await HealthServer(host, 0, checks=checks, metrics=metrics).__aenter__()
        log.warning("port %d is taken; health endpoints on port %d instead", port, server.port)
        return server
