"""Serves an ASGI application with uvicorn inside the running event loop (no thread, no second process).

The router's HTTP API and a worker's health endpoints both run this way, so ``/healthz`` answers
whenever the process's loop turns. The listening socket is bound here, so a port in use is a clear
:class:`~fabric.errors.ConfigError` (uvicorn itself would exit the process), and uvicorn's signal
handlers are never installed (the process owns its signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from fabric.errors import ConfigError

#: How long open connections get to finish their answer when the server stops.
GRACEFUL_SHUTDOWN_S = 2


class AsgiServer:
    """``async with AsgiServer(app, host, port) as server:``; :attr:`port` is the bound port (0 picks one).

    Raises:
        ConfigError: on entry, when ``host:port`` cannot be listened on (taken, not an address here).
    """

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for before)."""
        return self._port

    async def __aenter__(self) -> Self:
        if self._server is not None:
            raise ConfigError("this server is running already")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of such a socket, and
        # without it Nagle and delayed ACKs add 40 ms to every response on a kept-alive connection.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"FABRIC_HTTP__PORT: cannot listen on {self._host}:{self._port} ({exc}); "
                "choose another port, or 0 for any free one"
            ) from exc
        sock.setblocking(False)
        config = uvicorn.Config(
            self._app,
            interface="asgi3",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._socket, self._server = sock, server
        self._port = int(sock.getsockname()[1])
        self._loop_task = asyncio.create_task(server.main_loop(), name=f"fabric-http :{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, sock = self._server, self._socket
        if server is None or sock is None:
            return
        server.should_exit = True
        if self._loop_task is not None:
            with contextlib.suppress(Exception):
                await self._loop_task
        with contextlib.suppress(Exception):
            await server.shutdown(sockets=[sock])
        sock.close()
        self._server = None
