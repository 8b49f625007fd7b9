"""A small HTTP server for ``/healthz``, ``/readyz`` and ``/metrics`` on router and worker processes.

Plain asyncio, no framework: it must keep answering while the process is busy, and cost nothing.
``/healthz`` says the process (its event loop) is alive; ``/readyz`` runs the process's readiness
checks (broker connected, consumers active, store writable) and answers 503 with the failing check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Self

from fabric.errors import ConfigError

log = logging.getLogger("fabric.health")

#: A readiness check: returns None when ready, else a short reason.
ReadinessCheck = Callable[[], Awaitable[str | None]]
#: Renders the Prometheus text exposition.
MetricsRenderer = Callable[[], str]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves the health endpoints on ``host:port``. Use as ``async with HealthServer(...)``.

    Args:
        checks: readiness checks by name.
        metrics: renders ``/metrics`` (Prometheus text format).
        port: 0 picks a free port (see :attr:`port` after start).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        checks: dict[str, ReadinessCheck],
        metrics: MetricsRenderer | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._checks = checks
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Self:
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
        except OSError as exc:
            raise ConfigError(
                f"FABRIC_HTTP__PORT: cannot listen on {self._host}:{self._port} ({exc}); "
                "choose another port, or 0 for any free one"
            ) from exc
        log.info("health endpoints on http://%s:%d/healthz", self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def readiness(self) -> dict[str, str]:
        """Run every check; map of check name to "ok" or the reason it fails."""
        return await run_checks(self._checks)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            status, content_type, body = await self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
