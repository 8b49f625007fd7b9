"""The router's HTTP application: health, metrics, the REST API and the dashboard, on one port.

FastAPI, because the OpenAPI document (``/api/v1/openapi.json``) is generated from the same pydantic
models that validate the parameters and shape the responses, so the document cannot drift from the
code; the submission schema in it is the wire model :class:`~fabric.protocol.messages.Submission`
itself. The application is given the router's parts (:class:`~fabric.router.http.ports.Parts`), never
the router: the HTTP layer does not import :mod:`fabric.router.service`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from fabric.errors import StoreError, TransportError
from fabric.health import METRICS_CONTENT_TYPE, MetricsRenderer, ReadinessCheck, run_checks
from fabric.protocol.messages import Rejected, RejectReason, Submission
from fabric.router.http.api import API, OPENAPI_PATH, REJECTION_STATUS, api_routes
from fabric.router.http.dashboard import dashboard_routes
from fabric.router.http.models import Health, Readiness
from fabric.router.http.ports import Parts
from fabric.router.http.views import json_response, problem

log = logging.getLogger("fabric.http")


def build_app(
    parts: Parts,
    *,
    checks: dict[str, ReadinessCheck],
    metrics: MetricsRenderer | None,
    dashboard: bool = True,
) -> FastAPI:
    """The router's HTTP application: health, metrics, the REST API and (with ``dashboard``) the
    dashboard, served from ``parts``."""
    app = FastAPI(
        title="fabric router",
        version="1",
        description="Submit workflows, follow them, cancel them; see agents and parked tasks. "
        "Submissions behave exactly as on AMQP (docs/protocol.md §2-3).",
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    included = [api_routes(parts), *([dashboard_routes(parts)] if dashboard else [])]

    def routes() -> Iterator[BaseRoute]:
        """Every route served: the application's own and those of the routers it includes."""
        yield from app.routes
        for router in included:
            yield from router.routes

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
        if request.method == "POST" and request.url.path == f"{API}/workflows":
            # A submission is answered with a rejection whatever is wrong with it (here: a header).
            rejected = Rejected(workflow_id=None, reason=RejectReason.INVALID, detail=detail, errors=errors)
            return json_response(rejected, REJECTION_STATUS[RejectReason.INVALID])
        return problem(400, "invalid_parameter", detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        response = problem(exc.status_code, code, detail)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names the methods of one route only; a path served by several lists them all.
            allowed = {
                method
                for route in routes()
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods or ()
            }
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    @app.exception_handler(StoreError)
    @app.exception_handler(TransportError)
    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        response = problem(503, "unavailable", f"{type(exc).__name__}: {exc}; try again")
        response.headers["Retry-After"] = "1"
        return response

    # -- health and metrics ---------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["health"], summary="the process is alive")
    async def healthz() -> Response:
        return json_response(Health())

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["health"],
        summary="broker connected, consumers active, store writable",
        responses={503: {"model": Readiness, "description": "a check fails (named in `checks`)"}},
    )
    async def readyz() -> Response:
        results = await run_checks(checks)
        ready = all(v == "ok" for v in results.values())
        return json_response(
            Readiness(status="ready" if ready else "unready", checks=results), 200 if ready else 503
        )

    if metrics is not None:
        render = metrics

        @app.get(
            "/metrics",
            tags=["health"],
            summary="Prometheus text exposition",
            response_class=Response,
            responses={200: {"content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}},
        )
        async def prometheus() -> Response:
            return Response(render().encode(), media_type=METRICS_CONTENT_TYPE)

    for router in included:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            submission = Submission.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(submission.pop("$defs", {}))
            schemas["Submission"] = submission
            # Parameter errors are answered 400 with a Problem (see invalid_parameter), not FastAPI's 422.
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    validation = responses.get("422", {})
                    if "HTTPValidationError" in str(validation):
                        del responses["422"]
                        responses.setdefault("400", _openapi_problem("a parameter is invalid"))
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi_problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
