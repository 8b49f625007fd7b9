"""The dashboard at ``/``: static pages shipped in the package, fed by the REST API of
:mod:`fabric.router.http.api` and by one live stream.

* ``GET /`` and ``GET /workflows/{id}``: the page (``static/index.html``); its script draws the live view
  or the workflow's DAG. No CDN, no build step: vanilla JavaScript and SVG.
* ``GET /api/v1/stream``: server-sent events, one ``snapshot`` every ``http.stream_interval_s``: the
  ``/api/v1/stats`` summary, the agents of ``/api/v1/agents``, running and recent workflows of
  ``/api/v1/workflows``, the firing alerts of ``/api/v1/alerts``, the escalated tasks of
  ``/api/v1/escalated``, and the live rates (built by the same functions as those endpoints, so there is
  one data path). The stream ends when the router stops; browsers reconnect by themselves.
* ``GET /favicon.ico``: the icon browsers ask for.
* ``GET /api/v1/history``: the samples the active router stores every ``router.sample_interval_s``
  (:meth:`~fabric.store.base.StateStore.add_sample`), for the trend charts: history survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from fabric.errors import StoreError, TransportError
from fabric.protocol.messages import WorkflowStatus
from fabric.router.http.api import API
from fabric.router.http.models import History, HistorySample
from fabric.router.http.ports import Parts
from fabric.router.http.views import (
    agent_views,
    build_stats,
    escalated_tasks,
    firing_alerts,
    workflow_summaries,
)
from fabric.store.base import WorkflowQuery

#: Workflows listed in each of the live view's tables.
LIVE_WORKFLOWS = 15
#: Escalated tasks the live view's "Needs attention" box lists at most.
LIVE_ESCALATED = 20
#: Seconds of totals the live rates are computed over.
RATE_WINDOW_S = 10.0

_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return (resources.files("fabric.router.http") / "static" / name).read_bytes()


class Rates:
    """Throughput and error rate over the last :data:`RATE_WINDOW_S`, from the router's totals."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, now: float, totals: dict[str, int]) -> dict[str, float]:
        self._points.append((now, dict(totals)))
        while len(self._points) > 2 and now - self._points[1][0] >= RATE_WINDOW_S:
            self._points.popleft()
        start, first = self._points[0]
        elapsed = now - start

        def moved(key: str) -> int:
            return totals.get(key, 0) - first.get(key, 0)

        finished = moved("tasks_succeeded") + moved("tasks_failed") + moved("tasks_parked")
        failed_attempts = moved("tasks_failed") + moved("tasks_parked") + moved("tasks_retried")
        attempts = moved("tasks_succeeded") + failed_attempts
        return {
            "window_s": round(elapsed, 3),
            "tasks_per_s": round(finished / elapsed, 3) if elapsed > 0 else 0.0,
            "error_rate": round(failed_attempts / attempts, 4) if attempts else 0.0,
        }


async def snapshot(parts: Parts, rates: Rates) -> dict[str, Any]:
    """One live-view update: what ``/stats``, ``/agents``, ``/workflows``, ``/alerts`` and
    ``/escalated`` answer now, plus rates."""
    monitoring, store = parts.monitoring, parts.store
    views = await agent_views(monitoring)
    stats = await build_stats(monitoring, store, views)
    running = await workflow_summaries(store, WorkflowQuery(status=WorkflowStatus.RUNNING), LIVE_WORKFLOWS)
    recent = await workflow_summaries(store, WorkflowQuery(), LIVE_WORKFLOWS)
    escalated = await escalated_tasks(store, LIVE_ESCALATED)
    totals = monitoring.totals()
    return {
        "at": time.time(),
        "stats": stats.model_dump(mode="json"),
        "rates": rates.update(time.time(), totals),
        "totals": totals,
        "agents": [v.model_dump(mode="json") for v in views],
        "running": [w.model_dump(mode="json") for w in running],
        "recent": [w.model_dump(mode="json") for w in recent],
        "alerts": [a.model_dump(mode="json") for a in firing_alerts(monitoring).items],
        "escalated": [t.model_dump(mode="json") for t in escalated.items],
    }


def dashboard_routes(parts: Parts) -> APIRouter:
    """The dashboard's pages, assets, live stream and history."""
    settings = parts.settings
    routes = APIRouter()
    page = (
        _asset("index.html")
        .decode()
        .replace("{{jaeger_url}}", html.escape(settings.http.jaeger_url.rstrip("/"), quote=True))
        .replace("{{namespace}}", html.escape(settings.namespace))
        .encode()
    )
    assets = {name: _asset(name) for name in _STATIC}

    def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @routes.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        return index()

    @routes.get("/workflows/{workflow_id}", include_in_schema=False)
    async def workflow_page(workflow_id: str) -> Response:
        # The script reads the id from the path and asks /api/v1/workflows/{id} (a 404 is shown there).
        return index()

    favicon = _asset("favicon.ico")

    @routes.get("/favicon.ico", include_in_schema=False)
    async def icon() -> Response:
        return Response(favicon, media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})

    @routes.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        body = assets.get(name)
        if body is None:
            return Response(f"no asset {name!r}\n", 404, media_type="text/plain")
        return Response(body, media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    @routes.get(f"{API}/stream", include_in_schema=False)
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            _events(parts, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @routes.get(
        f"{API}/history",
        response_model=History,
        tags=["stats"],
        summary="the stored samples behind the dashboard's trend charts, oldest first",
    )
    async def history(
        since: Annotated[
            float | None,
            Query(ge=0, description="seconds since the epoch; default: `router.history_s` ago"),
        ] = None,
    ) -> Response:
        start = since if since is not None else time.time() - settings.router.history_s
        samples = await parts.store.samples(start)
        body = History(
            interval_s=settings.router.sample_interval_s,
            items=[HistorySample(at=s.at, data=s.data) for s in samples],
        )
        return Response(body.model_dump_json(), media_type="application/json")

    return routes


async def _events(parts: Parts, request: Request) -> AsyncIterator[bytes]:
    """Server-sent events: a ``snapshot`` each interval, an ``error`` event while the store or broker
    fails (the stream goes on), until the client leaves or the router stops."""
    interval = parts.settings.http.stream_interval_s
    stopping = parts.monitoring.stopping
    rates = Rates()
    yield b"retry: 1000\n\n"
    while not stopping.is_set():
        try:
            doc = await snapshot(parts, rates)
            event = "snapshot"
        except (StoreError, TransportError) as exc:
            doc = {"error": f"{type(exc).__name__}: {exc}"}
            event = "problem"
        yield f"event: {event}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()
        if await request.is_disconnected():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
