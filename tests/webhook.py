"""A tiny in-process webhook receiver for tests (plain asyncio, loopback only).

Each path can be told how to answer: fail the first N requests with a status, or hang (never answer).
Every request is recorded with its parsed JSON body, including those it failed or is hanging on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Self


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class _Behaviour:
    fail_first: int = 0
    fail_status: int = 500
    hang: bool = False
    seen: int = 0


@dataclass
class WebhookServer:
    """``async with WebhookServer() as hooks:``; ``hooks.url("/ok")`` is a URL to configure."""

    received: list[Received] = field(default_factory=list)
    port: int = 0
    _behaviours: dict[str, _Behaviour] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fail_first(self, path: str, times: int, status: int = 500) -> None:
        """Answer the first ``times`` requests to ``path`` with ``status``, then 200."""
        self._behaviours[path] = _Behaviour(fail_first=times, fail_status=status)

    def hang(self, path: str) -> None:
        """Never answer requests to ``path`` (the connection stays open until the server stops)."""
        self._behaviours[path] = _Behaviour(hang=True)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        assert current is not None
        self._handlers.add(current)
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            _, path, _ = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            raw = await reader.readexactly(length) if length else b""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            self.received.append(Received(path, headers, body, asyncio.get_running_loop().time()))
            behaviour = self._behaviours.setdefault(path, _Behaviour())
            behaviour.seen += 1
            if behaviour.hang:
                await asyncio.Event().wait()  # until the server stops
            status = behaviour.fail_status if behaviour.seen <= behaviour.fail_first else 200
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(current)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
