"""Webhook delivery over HTTP: what a failed answer means, connections, TLS, redirects, credentials.

The receivers are loopback servers started by each test (no broker).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fabric.alerts import AlertPublisher, status_failure
from fabric.asgi import AsgiServer
from fabric.protocol.messages import AlertSeverity
from fabric.settings import AlertSettings
from tests.webhook import WebhookServer


@pytest.mark.parametrize(
    ("status", "failed", "retryable"),
    [
        (200, False, False),
        (202, False, False),
        (204, False, False),
        (301, True, False),
        (307, True, False),
        (400, True, False),
        (401, True, False),
        (404, True, False),
        (408, True, True),
        (425, True, True),
        (429, True, True),
        (500, True, True),
        (503, True, True),
    ],
)
def test_which_answers_fail_and_which_are_retried(status: int, failed: bool, retryable: bool) -> None:
    failure = status_failure(status)
    assert (failure is not None) == failed
    assert failure is None or (failure.retryable, str(failure)) == (retryable, f"HTTP {status}")


@dataclass
class Hit:
    path: str
    client_port: int
    headers: dict[str, str]
    body: Any


@dataclass
class KeepAliveHooks:
    """An HTTP/1.1 receiver that keeps connections open (uvicorn); ``/moved`` answers a 307."""

    hits: list[Hit] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        assert request.client is not None
        body = await request.json()
        self.hits.append(Hit(request.url.path, request.client.port, dict(request.headers), body))
        if request.url.path == "/moved":
            response = Response(status_code=307, headers={"location": "/ok"})
        else:
            response = Response(b"thanks", 200)
        await response(scope, receive, send)


@contextlib.asynccontextmanager
async def keep_alive_hooks() -> AsyncIterator[tuple[KeepAliveHooks, str]]:
    hooks = KeepAliveHooks()
    async with AsgiServer(hooks, "127.0.0.1", 0) as server:
        yield hooks, f"127.0.0.1:{server.port}"


def fire(alerts: AlertPublisher, key: str) -> None:
    alerts.fire(key, kind="test.kind", severity=AlertSeverity.INFO, summary=f"{key} happened")


FAST = {"webhook_backoff_s": 0.01, "webhook_timeout_s": 5.0}


async def test_one_connection_carries_every_alert_to_a_webhook_that_keeps_it_open() -> None:
    async with keep_alive_hooks() as (hooks, address):
        settings = AlertSettings(webhooks=[f"http://{address}/ok"], **FAST)
        async with AlertPublisher(settings, "ns", None) as alerts:
            for key in ("a", "b", "c"):
                fire(alerts, key)
            await alerts.flush(10)
    assert [hit.body["key"] for hit in hits(hooks, "/ok")] == ["a", "b", "c"]
    assert len({hit.client_port for hit in hooks.hits}) == 1, "one connection, kept for the next alert"
    assert alerts.stats["delivered"] == 3


def hits(hooks: KeepAliveHooks, path: str) -> list[Hit]:
    return [hit for hit in hooks.hits if hit.path == path]


async def test_a_redirect_is_not_followed_nor_retried() -> None:
    async with keep_alive_hooks() as (hooks, address):
        settings = AlertSettings(webhooks=[f"http://{address}/moved"], **FAST)
        async with AlertPublisher(settings, "ns", None) as alerts:
            fire(alerts, "a")
            await alerts.flush(10)
    assert [hit.path for hit in hooks.hits] == ["/moved"]
    assert (alerts.stats["delivered"], alerts.stats["failed"]) == (0, 1)


async def test_user_and_password_in_the_url_go_as_basic_auth_with_the_json_body() -> None:
    async with keep_alive_hooks() as (hooks, address):
        url = f"http://ops:p%40ss@{address}/ok?token=t1"
        settings = AlertSettings(webhooks=[url], **FAST)
        async with AlertPublisher(settings, "ns", None) as alerts:
            fire(alerts, "a")
            await alerts.flush(10)
    (hit,) = hooks.hits
    assert hit.headers["authorization"] == "Basic " + base64.b64encode(b"ops:p@ss").decode()
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["user-agent"] == "fabric-alerts"
    assert hit.body["key"] == "a"


async def test_an_answer_whose_body_never_ends_counts_as_delivered_and_holds_up_no_one() -> None:
    """Only the status counts; a body that never comes costs the next alert a moment, not the timeout."""
    stalled: list[asyncio.StreamWriter] = []

    async def answer_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
            await writer.drain()
            stalled.append(writer)

    server = await asyncio.start_server(answer_then_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = AlertSettings(
            webhooks=[f"http://127.0.0.1:{port}/slow"],
            webhook_timeout_s=30,
            webhook_backoff_s=0.01,
        )
        started = time.monotonic()
        async with AlertPublisher(settings, "ns", None) as alerts:
            fire(alerts, "a")
            fire(alerts, "b")
            await alerts.flush(20)
        assert (alerts.stats["delivered"], alerts.stats["failed"]) == (2, 0)
        assert time.monotonic() - started < 10, "not held for the 30 s timeout"
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()


# -- https -----------------------------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "key.pem", "c.csr", "c.pem"))
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=fabric test CA")
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", ext)  # fmt: skip
    return ca, cert, key


class TlsWebhookServer(WebhookServer):
    """The test receiver of tests/webhook.py behind TLS."""

    tls: ssl.SSLContext

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> TlsWebhookServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


async def test_an_https_webhook_is_verified_against_the_trust_store_that_ssl_cert_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ca, cert, key = make_certificates(tmp_path)
    server = TlsWebhookServer()
    server.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.tls.load_cert_chain(cert, key)
    async with server as hooks:
        settings = AlertSettings(webhooks=[hooks.url("/tls")], webhook_retries=1, webhook_backoff_s=0.01)
        # Not trusted: the certificate is refused (a connection error, so retried, then given up).
        async with AlertPublisher(settings, "ns", None) as alerts:
            fire(alerts, "untrusted")
            await alerts.flush(20)
        assert (alerts.stats["delivered"], alerts.stats["failed"]) == (0, 1)
        assert hooks.at("/tls") == [], "nothing is sent to a server that is not trusted"

        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        async with AlertPublisher(settings, "ns", None) as alerts:
            fire(alerts, "trusted")
            await alerts.flush(20)
        assert (alerts.stats["delivered"], alerts.stats["failed"]) == (1, 0)
        assert [r.body["key"] for r in hooks.at("/tls")] == ["trusted"]
