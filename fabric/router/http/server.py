"""The router's HTTP server: uvicorn inside the router's own event loop (no thread, no second process,
:class:`~fabric.asgi.AsgiServer`), so ``/healthz`` answers whenever the loop turns; and its start line."""

from __future__ import annotations

import logging
from typing import Self

from fastapi import FastAPI
from starlette.routing import NoMatchFound

from fabric.asgi import AsgiServer
from fabric.router.http.api import API

log = logging.getLogger("fabric.http")


def serves_dashboard(app: FastAPI) -> bool:
    """True when ``app`` has the dashboard's page at ``/`` (the router includes it; tests may not)."""
    try:
        return app.url_path_for("dashboard") == "/"
    except NoMatchFound:
        return False


def start_line(host: str, port: int, *, dashboard: bool) -> str:
    """The log line that says where the router's HTTP port serves what, with URLs a user can open.

    Example:
        >>> start_line("::1", 80, dashboard=True)
        'dashboard on http://[::1]:80/, HTTP API on http://[::1]:80/api/v1 (health: /healthz, /readyz)'
    """
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    api = f"HTTP API on {base}{API} (health: /healthz, /readyz)"
    return f"dashboard on {base}/, {api}" if dashboard else api


class ApiServer(AsgiServer):
    """Serves the router's application (see :class:`~fabric.asgi.AsgiServer`) and logs where.

    Use as ``async with ApiServer(app, host, port) as server:``; :attr:`port` is the bound port.
    """

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        super().__init__(app, host, port)
        self._dashboard = serves_dashboard(app)

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        log.info("%s", start_line(self.host, self.port, dashboard=self._dashboard))
        return self
