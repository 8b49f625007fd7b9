"""A worker's health endpoints (fabric.health): paths, answers, port handling, shutdown. Loopback only."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from fabric.errors import ConfigError
from fabric.health import METRICS_CONTENT_TYPE, HealthServer, ReadinessCheck, serve_health


async def ready() -> str | None:
    return None


async def broker_down() -> str | None:
    return "broker connection is down"


def metrics() -> str:
    return "fabric_up 1\n"


@pytest.mark.parametrize(
    ("method", "path", "status", "content_type", "body"),
    [
        ("GET", "/healthz", 200, "application/json", b'{"status":"ok"}\n'),
        ("GET", "/healthz?verbose=1", 200, "application/json", b'{"status":"ok"}\n'),
        ("GET", "/readyz", 200, "application/json", b'{"status": "ready", "checks": {"broker": "ok"}}\n'),
        ("GET", "/metrics", 200, METRICS_CONTENT_TYPE, b"fabric_up 1\n"),
        ("GET", "/nope", 404, "text/plain", b"not found\n"),
        ("GET", "/healthz/", 404, "text/plain", b"not found\n"),
        ("POST", "/healthz", 405, "text/plain", b"only GET\n"),
        ("POST", "/nope", 405, "text/plain", b"only GET\n"),
        ("DELETE", "/metrics", 405, "text/plain", b"only GET\n"),
        ("HEAD", "/healthz", 200, "application/json", b""),
    ],
)
async def test_each_path_answers_as_documented(
    method: str, path: str, status: int, content_type: str, body: bytes
) -> None:
    async with (
        HealthServer("127.0.0.1", 0, checks={"broker": ready}, metrics=metrics) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        answer = await http.request(method, path)
    assert (answer.status_code, answer.headers["content-type"], answer.content) == (
        status,
        content_type,
        body,
    )


async def test_readyz_is_503_naming_the_failing_check_and_metrics_is_404_without_a_renderer() -> None:
    checks: dict[str, ReadinessCheck] = {"broker": broker_down, "consumers": ready}
    async with (
        HealthServer("127.0.0.1", 0, checks=checks) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        unready = await http.get("/readyz")
        no_metrics = await http.get("/metrics")
    assert unready.status_code == 503
    assert json.loads(unready.content) == {
        "status": "unready",
        "checks": {"broker": "broker connection is down", "consumers": "ok"},
    }
    assert no_metrics.status_code == 404


async def test_a_scraper_may_keep_its_connection_for_the_next_request() -> None:
    async with HealthServer("127.0.0.1", 0, checks={}, metrics=metrics) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for _ in range(2):
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await asyncio.wait_for(reader.readexactly(len(metrics())), 10) == metrics().encode()
        finally:
            writer.close()


async def test_a_taken_port_is_a_clear_error_or_with_fallback_any_free_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"FABRIC_HTTP__PORT: cannot listen on 127.0.0.1:{port} .*or 0"):
            await serve_health("127.0.0.1", port, checks={}, metrics=metrics, fallback=False)
        server = await serve_health("127.0.0.1", port, checks={}, metrics=metrics, fallback=True)
        try:
            assert server.port not in (0, port)
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200
        finally:
            await server.__aexit__(None, None, None)


async def test_stopping_closes_the_port_and_idle_connections() -> None:
    async with HealthServer("127.0.0.1", 0, checks={}) as server:
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}\n'), 10)
    assert await asyncio.wait_for(reader.read(), 10) == b"", "the idle connection is closed"
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    # The port is free again for the next process.
    async with HealthServer("127.0.0.1", port, checks={}) as again:
        assert again.port == port
