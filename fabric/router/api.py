"""The router's HTTP interface (docs/protocol.md §12): health, metrics and the REST API, on one port.

FastAPI on uvicorn, served inside the router's own event loop (no thread, no second process): the API
calls the router's methods directly, and ``/healthz`` answers whenever the loop turns. FastAPI because
the OpenAPI document (``/api/v1/openapi.json``) is generated from the same pydantic models that
validate the parameters and shape the responses, so the document cannot drift from the code; the
submission schema in it is the wire model :class:`~fabric.protocol.messages.Submission` itself.

``POST /api/v1/workflows`` hands the raw body to :meth:`Router.submit`, the path AMQP submissions take:
same admission, same rejection codes and details, same idempotency (the ``Idempotency-Key`` header is
the AMQP ``message_id``), and ``202`` only once the workflow is stored and its ready tasks are confirmed
by the broker. Reads come from the state store, in pages with a keyset cursor.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fabric.asgi import AsgiServer
from fabric.errors import ProtocolError, StoreError, TransportError, message_of
from fabric.health import METRICS_CONTENT_TYPE, MetricsRenderer, ReadinessCheck, run_checks
from fabric.protocol import codec
from fabric.protocol.messages import (
    CAPABILITY_PATTERN,
    TASK_ID_PATTERN,
    WORKFLOW_ID_PATTERN,
    Accepted,
    Alert,
    ErrorInfo,
    Rejected,
    RejectReason,
    Submission,
    TaskStatus,
    WorkflowStatus,
)
from fabric.router.admission import Refusal, too_large
from fabric.store.base import MAX_PAGE, DeadQuery, TaskRecord, WorkflowQuery, WorkflowRecord, parked_at

if TYPE_CHECKING:
    from fabric.router.service import Router

log = logging.getLogger("fabric.http")

API = "/api/v1"
OPENAPI_PATH = f"{API}/openapi.json"

#: HTTP status of each rejection reason of docs/protocol.md §3.
REJECTION_STATUS: dict[RejectReason, int] = {
    RejectReason.UNSUPPORTED_CONTENT_TYPE: 415,
    RejectReason.MALFORMED: 400,
    RejectReason.INVALID: 422,
    RejectReason.TOO_LARGE: 413,
    RejectReason.DUPLICATE_TASK_ID: 422,
    RejectReason.UNKNOWN_DEPENDENCY: 422,
    RejectReason.CYCLE: 422,
    RejectReason.CONFLICT: 409,
    RejectReason.FORBIDDEN: 403,
    RejectReason.RATE_LIMITED: 429,
}

#: Running workflows whose capabilities ``/stats`` looks at (beside the agents' and the published ones).
KNOWN_WORKFLOWS = 200

#: Longest Idempotency-Key accepted (an AMQP message_id is a short string of at most 255 bytes).
MAX_IDEMPOTENCY_KEY = 255


# -- response models --------------------------------------------------------------------------------


class Problem(BaseModel):
    """An error that is not a submission's rejection: what went wrong, in words and as a code."""

    error: str = Field(description="a short code: not_found, invalid_parameter, unavailable, ...")
    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    checks: dict[str, str] = Field(description='each check: "ok" or the reason it fails')


class WorkflowSummary(BaseModel):
    workflow_id: str
    status: WorkflowStatus
    task_count: int
    remaining: int = Field(description="tasks not finished yet")
    capabilities: list[str]
    metadata: dict[str, str]
    created_at: float = Field(description="seconds since the epoch (UTC)")
    finished_at: float | None
    trace_id: str | None = Field(
        default=None, description="W3C trace id of the workflow's trace (when tracing was on), for Jaeger"
    )


class WorkflowPage(BaseModel):
    items: list[WorkflowSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null after the last")


class HistoryEntry(BaseModel):
    """One failed (or replayed) attempt."""

    attempt: int
    agent: str | None = None
    error: ErrorInfo | None = None
    at: float | None = None


class TaskDetail(BaseModel):
    status: TaskStatus
    capability: str
    depends_on: list[str]
    dependents: list[str]
    priority: int
    timeout_s: float | None
    max_attempts: int
    attempts: int
    agent: str | None
    result: Any = None
    error: ErrorInfo | None
    history: list[HistoryEntry]
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    retry_at: float | None = Field(description="while retrying: when the next attempt is due")
    escalation: dict[str, Any] | None = Field(
        default=None, description="while escalated: its reason, attempt, agent, error and time"
    )


class WorkflowDetail(WorkflowSummary):
    """A workflow and each of its tasks. Once finished (``kind`` ``completed``) it holds every field of
    the ``completed`` document of docs/protocol.md §3."""

    kind: Literal["running", "completed"]
    counts: dict[str, int] = Field(description="tasks by status")
    tasks: dict[str, TaskDetail]


class WhyAnswer(BaseModel):
    """Why a task is not running (or where it runs), as ``fabric why``; fields beyond ``detail`` come
    with the reasons they belong to."""

    task_id: str
    status: TaskStatus
    capability: str | None = Field(default=None, description="the task's capability")
    reason: str = Field(
        description="finished, waiting_on, queued, no_agent, circuit_open, running_on, backoff_until, "
        "escalated, or a status that waits for an operator"
    )
    detail: str
    waiting_on: list[str] | None = Field(default=None, description="waiting_on: unfinished dependencies")
    queue_depth: int | None = Field(
        default=None, description="queued, no_agent, circuit_open: tasks in the capability's queue"
    )
    agents: list[str] | None = Field(default=None, description="queued, circuit_open: the live agents")
    breakers: dict[str, str] | None = Field(
        default=None, description="circuit_open: each live agent's breaker state (open, half_open)"
    )
    unhealthy_agents: list[str] | None = Field(
        default=None, description="queued: live agents the stall watchdog found not consuming"
    )
    agent: str | None = Field(default=None, description="running_on, escalated: the agent")
    since: float | None = Field(default=None, description="running_on, escalated: since when")
    until: float | None = Field(default=None, description="backoff_until: when the next attempt is due")
    escalation_reason: str | None = None


class WhyList(BaseModel):
    items: list[WhyAnswer]


class CancelResult(BaseModel):
    workflow_id: str
    cancelled: list[str] = Field(description="the tasks this call cancelled (none when all had finished)")
    status: WorkflowStatus


class ResumeRequest(BaseModel):
    """Resume an escalated task; with ``input`` (``null`` included) it runs with that input instead."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None


class ResumeResult(BaseModel):
    workflow_id: str
    task_id: str
    status: TaskStatus = Field(description="`queued`: published again from attempt 1")
    new_input: bool


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000, description="recorded as the task's error")


class AbortResult(BaseModel):
    workflow_id: str
    task_id: str
    status: TaskStatus = Field(description="`dead`")
    upstream_failed: list[str] = Field(description="the dependents that will not run")
    workflow_status: WorkflowStatus


class AgentView(BaseModel):
    agent_id: str
    agent: str
    host: str
    pid: int
    capabilities: list[str]
    concurrency: int
    in_flight: int
    processed: int
    failed: int
    health: str
    breakers: dict[str, str] = Field(description="capability -> closed, open or half_open")
    interval_s: float
    free_since: float | None = Field(
        default=None, description="since when it has had a free slot; null at its concurrency limit"
    )
    consumers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="capability -> consuming, subscribed_at, last_delivery_at, deliveries, score "
        "(its x-priority), success_rate, latency_ms",
    )
    unhealthy: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="capability -> {reason, since, quiet_s, last_delivery_at}: stalls the router's "
        "watchdog found (no task taken although its queue has work and it has room)",
    )
    first_seen: float
    last_seen: float
    state: Literal["alive", "unhealthy", "lost", "stopped"] = Field(
        description="lost after three missed heartbeats; stopped when its last heartbeat said it stopped "
        "cleanly; unhealthy while the stall watchdog has marked it"
    )
    reason: str | None = Field(default=None, description="with unhealthy: why")
    silent_s: float


class AgentList(BaseModel):
    items: list[AgentView]


class DeadTask(BaseModel):
    workflow_id: str
    task_id: str
    capability: str
    attempts: int
    max_attempts: int
    agent: str | None
    error: ErrorInfo | None
    history: list[HistoryEntry]
    parked_at: float


class QueueDepth(BaseModel):
    queue: str
    messages: int
    consumers: int


class DeadPage(BaseModel):
    items: list[DeadTask]
    next_cursor: str | None
    queue: QueueDepth | None = Field(
        description="the parking queue as the broker counts it (with messages that are not tasks)"
    )


class AgentCounts(BaseModel):
    alive: int
    unhealthy: int = 0
    lost: int
    stopped: int = 0


class CapabilityQueue(QueueDepth):
    agents: int = Field(description="live agents (alive or unhealthy) that have a handler for the capability")


class Stats(BaseModel):
    namespace: str
    active: bool = Field(description="this router consumes submissions and events (others are standbys)")
    uptime_s: float
    counters: dict[str, int] = Field(description="what this router did since it started")
    agents: AgentCounts
    queues: dict[str, CapabilityQueue] = Field(
        description="per capability of a known agent, of a task this router published, or of a running "
        "workflow: also a queue no agent serves (messages and no consumers: stuck until one comes)"
    )
    dead: QueueDepth | None


class AlertList(BaseModel):
    active: bool = Field(
        description="this router evaluates the alert rules; a standby answers with no rule alerts"
    )
    items: list[Alert] = Field(description="the conditions firing now, oldest first")


class EscalatedTask(BaseModel):
    """A task that waits for an operator: ``POST .../resume`` runs it again, ``POST .../abort`` gives up."""

    workflow_id: str
    task_id: str
    capability: str
    attempts: int
    max_attempts: int
    agent: str | None
    error: ErrorInfo | None
    escalation: dict[str, Any] | None = Field(description="its reason, attempt, agent, error and time")
    created_at: float


class EscalatedList(BaseModel):
    items: list[EscalatedTask] = Field(description="oldest first")


# -- the application --------------------------------------------------------------------------------


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response through fabric's codec (bytes become base64 text, as in JSON replies on AMQP)."""
    body = codec.encode(model.model_dump(mode="python"), codec.JSON)
    return Response(body, status, headers=headers, media_type="application/json")


def _problem(status: int, error: str, detail: str, errors: list[dict[str, Any]] | None = None) -> Response:
    return _json(Problem(error=error, detail=detail, errors=errors or []), status)


def _refused(exc: Exception) -> Response:
    """The answer to a request the router refused: no such workflow or task (``KeyError``) 404, a new
    input over the size limit (``ProtocolError``) 413, a task in the wrong state (``ValueError``) 409."""
    if isinstance(exc, KeyError):
        return _problem(404, "not_found", message_of(exc))
    if isinstance(exc, ProtocolError):
        return _problem(413, "too_large", str(exc))
    return _problem(409, "not_escalated", str(exc))


def _timestamp(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _errors(raw: dict[str, str] | None) -> ErrorInfo | None:
    return ErrorInfo(type=str(raw.get("type", "")), message=str(raw.get("message", ""))) if raw else None


def _history(task: TaskRecord) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            attempt=int(h.get("attempt") or 0),
            agent=h.get("agent"),
            error=_errors(h.get("error")),
            at=h.get("at"),
        )
        for h in task.history
    ]


def _summary(w: WorkflowRecord) -> dict[str, Any]:
    return {
        "workflow_id": w.workflow_id,
        "status": w.status,
        "task_count": w.task_count,
        "remaining": w.remaining,
        "capabilities": w.capabilities,
        "metadata": w.metadata,
        "created_at": w.created_at,
        "finished_at": w.finished_at,
        "trace_id": w.trace_id,
    }


def _task_detail(t: TaskRecord) -> TaskDetail:
    return TaskDetail(
        status=t.status,
        capability=t.capability,
        depends_on=t.depends_on,
        dependents=t.dependents,
        priority=t.priority,
        timeout_s=t.timeout_s,
        max_attempts=t.max_attempts,
        attempts=t.attempts,
        agent=t.agent,
        result=t.result,
        error=_errors(t.error),
        history=_history(t),
        created_at=t.created_at,
        queued_at=t.queued_at,
        started_at=t.started_at,
        finished_at=t.finished_at,
        retry_at=t.retry_at,
        escalation=t.escalation,
    )


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such workflow (or task)"}
}
_NOT_ESCALATED: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "the task is not escalated (`detail` says what it is)"}
}
_INPUT_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "the new input is larger than FABRIC_ROUTER__MAX_BODY_BYTES"}
}
_BAD_PARAMETER: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "a parameter is invalid (named in `detail`)"}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "the store or the broker is unavailable; retry"}
}

WorkflowIdPath = Annotated[str, Path(pattern=WORKFLOW_ID_PATTERN, description="the workflow's id")]
TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="the task's id")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="most items in the page")]
CursorQuery = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the previous page")]
CapabilityQuery = Annotated[str | None, Query(pattern=CAPABILITY_PATTERN)]
TimeQuery = Annotated[
    float | datetime | None,
    Query(description="seconds since the epoch, or an RFC 3339 date-time (UTC when it has no zone)"),
]


def build_app(
    router: Router,
    *,
    checks: dict[str, ReadinessCheck],
    metrics: MetricsRenderer | None,
) -> FastAPI:
    """The router's HTTP application: health, metrics and the REST API."""
    app = FastAPI(
        title="fabric router",
        version="1",
        description="Submit workflows, follow them, cancel them; see agents and parked tasks. "
        "Submissions behave exactly as on AMQP (docs/protocol.md §2-3).",
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    settings = router.settings.router

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
            return _json(rejected, REJECTION_STATUS[RejectReason.INVALID])
        return _problem(400, "invalid_parameter", detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        response = _problem(exc.status_code, code, detail)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names the methods of one route only; a path served by several lists them all.
            allowed = {
                method
                for route in app.routes
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods or ()
            }
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    @app.exception_handler(StoreError)
    @app.exception_handler(TransportError)
    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        response = _problem(503, "unavailable", f"{type(exc).__name__}: {exc}; try again")
        response.headers["Retry-After"] = "1"
        return response

    # -- health and metrics ---------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["health"], summary="the process is alive")
    async def healthz() -> Response:
        return _json(Health())

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
        return _json(Readiness(status="ready" if ready else "unready", checks=results), 200 if ready else 503)

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

    # -- workflows --------------------------------------------------------------------------------

    @app.post(
        f"{API}/workflows",
        status_code=202,
        response_model=Accepted,
        tags=["workflows"],
        summary="submit a workflow (as on AMQP)",
        description="The body is a submission (docs/protocol.md §2) in JSON or msgpack, as "
        "`Content-Type` says. "
        "202 once the workflow is stored and its ready tasks are queued. A resend with the same "
        "`Idempotency-Key` (or the same `workflow_id`) and the same body is answered 202 again with the "
        "same workflow and creates nothing (`Idempotent-Replayed: true`); the same id with another body "
        "is a 409 `conflict`. A refused submission gets the `rejected` document of docs/protocol.md §3.",
        responses={
            **{
                code: {"model": Rejected, "description": "rejected: " + ", ".join(sorted(reasons))}
                for code, reasons in _reasons_by_status().items()
            },
            **_UNAVAILABLE,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                    "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def submit_workflow(
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=MAX_IDEMPOTENCY_KEY,
                description="the submission's id (AMQP `message_id`): a resend with the same key "
                "creates nothing new",
            ),
        ] = None,
        fabric_notify_tasks: Annotated[
            bool,
            Header(
                description="`true`: publish a notification per task state change of this workflow "
                "on `{ns}.notify` (`task.<workflow>.<task>.<status>`), as the AMQP header does",
            ),
        ] = False,
    ) -> Response:
        content_type = request.headers.get("content-type")
        router.stats["submissions"] += 1
        with router.http_span("POST", f"{API}/workflows", request.headers):
            body = await _read_body(request, settings.max_body_bytes)
            if isinstance(body, Refusal):
                outcome = await router.refuse(idempotency_key, body, content_type)
            else:
                outcome = await router.submit(
                    body,
                    content_type,
                    message_id=idempotency_key or None,
                    notify_tasks=fabric_notify_tasks,
                )
        reply = outcome.reply
        if isinstance(reply, Rejected):
            return _json(reply, REJECTION_STATUS.get(reply.reason, 400))
        headers = {"Location": f"{API}/workflows/{reply.workflow_id}"}
        if outcome.resent:
            headers["Idempotent-Replayed"] = "true"
        return _json(reply, 202, headers)

    @app.get(
        f"{API}/workflows",
        response_model=WorkflowPage,
        tags=["workflows"],
        summary="workflows, newest first, in pages",
        responses={**_BAD_PARAMETER, **_UNAVAILABLE},
    )
    async def list_workflows(
        status: WorkflowStatus | None = None,
        capability: CapabilityQuery = None,
        since: TimeQuery = None,
        until: TimeQuery = None,
        limit: LimitQuery = 50,
        cursor: CursorQuery = None,
    ) -> Response:
        query = WorkflowQuery(status, capability, _timestamp(since), _timestamp(until))
        try:
            page = await router.store.query_workflows(query, limit=limit, cursor=cursor)
        except ValueError as exc:
            return _problem(400, "invalid_parameter", f"cursor: {exc}")
        items = [WorkflowSummary(**_summary(w)) for w in page.items]
        return _json(WorkflowPage(items=items, next_cursor=page.next_cursor))

    @app.get(
        f"{API}/workflows/{{workflow_id}}",
        response_model=WorkflowDetail,
        tags=["workflows"],
        summary="a workflow and its tasks: state, attempts, history, timings, results",
        responses={**_NOT_FOUND, **_UNAVAILABLE},
    )
    async def get_workflow(workflow_id: WorkflowIdPath) -> Response:
        workflow = await router.store.get_workflow(workflow_id)
        if workflow is None:
            return _problem(404, "not_found", f"no workflow {workflow_id!r}")
        tasks = await router.store.get_tasks(workflow_id)
        counts: dict[str, int] = {}
        for t in tasks.values():
            counts[str(t.status)] = counts.get(str(t.status), 0) + 1
        detail = WorkflowDetail(
            **_summary(workflow),
            kind="completed" if workflow.status.terminal else "running",
            counts=counts,
            tasks={t.task_id: _task_detail(t) for t in tasks.values()},
        )
        return _json(detail)

    @app.get(
        f"{API}/workflows/{{workflow_id}}/why",
        response_model=WhyList,
        tags=["workflows"],
        summary="why each unfinished task is not running (as `fabric why`)",
        responses={**_NOT_FOUND, **_UNAVAILABLE},
    )
    async def why(
        workflow_id: WorkflowIdPath,
        task: Annotated[str | None, Query(pattern=TASK_ID_PATTERN, description="only this task")] = None,
    ) -> Response:
        try:
            answers = await router.why(workflow_id, task)
        except KeyError as exc:
            return _refused(exc)
        return _json(WhyList(items=[WhyAnswer(**a) for a in answers]))

    @app.post(
        f"{API}/workflows/{{workflow_id}}/cancel",
        response_model=CancelResult,
        tags=["workflows"],
        summary="cancel a workflow, or one task and everything downstream of it",
        responses={**_NOT_FOUND, **_UNAVAILABLE},
    )
    async def cancel_workflow(
        workflow_id: WorkflowIdPath,
        task: Annotated[
            str | None, Query(pattern=TASK_ID_PATTERN, description="cancel only this task and its dependents")
        ] = None,
    ) -> Response:
        try:
            result = await router.cancel(workflow_id, task)
        except KeyError as exc:
            return _refused(exc)
        return _json(CancelResult(**result))

    @app.post(
        f"{API}/workflows/{{workflow_id}}/tasks/{{task_id}}/resume",
        response_model=ResumeResult,
        tags=["workflows"],
        summary="run an escalated task again (fresh attempts), optionally with a new input",
        responses={**_NOT_FOUND, **_NOT_ESCALATED, **_INPUT_TOO_LARGE, **_UNAVAILABLE},
    )
    async def resume_task(
        workflow_id: WorkflowIdPath, task_id: TaskIdPath, body: ResumeRequest | None = None
    ) -> Response:
        new = {"input": body.input} if body is not None and "input" in body.model_fields_set else {}
        try:
            result = await router.resume(workflow_id, task_id, **new)
        except (KeyError, ValueError) as exc:
            return _refused(exc)
        return _json(ResumeResult(**result))

    @app.post(
        f"{API}/workflows/{{workflow_id}}/tasks/{{task_id}}/abort",
        response_model=AbortResult,
        tags=["workflows"],
        summary="give up on an escalated task: dead, its dependents upstream_failed",
        responses={**_NOT_FOUND, **_NOT_ESCALATED, **_UNAVAILABLE},
    )
    async def abort_task(
        workflow_id: WorkflowIdPath, task_id: TaskIdPath, body: AbortRequest | None = None
    ) -> Response:
        try:
            result = await router.abort(workflow_id, task_id, body.reason if body is not None else None)
        except (KeyError, ValueError) as exc:
            return _refused(exc)
        return _json(AbortResult(**result))

    # -- agents, dead letters, stats --------------------------------------------------------------

    @app.get(
        f"{API}/agents",
        response_model=AgentList,
        tags=["agents"],
        summary="agents seen through their heartbeats, alive, unhealthy, lost or stopped",
        responses={**_BAD_PARAMETER, **_UNAVAILABLE},
    )
    async def list_agents(
        state: Literal["alive", "unhealthy", "lost", "stopped"] | None = None,
        capability: CapabilityQuery = None,
    ) -> Response:
        views = await agent_views(router)
        items = [
            v
            for v in views
            if (state is None or v.state == state) and (capability is None or capability in v.capabilities)
        ]
        return _json(AgentList(items=items))

    @app.get(
        f"{API}/dead",
        response_model=DeadPage,
        tags=["dead letters"],
        summary="parked (dead) tasks, most recently parked first, in pages",
        responses={**_BAD_PARAMETER, **_UNAVAILABLE},
    )
    async def list_dead(
        capability: CapabilityQuery = None,
        since: TimeQuery = None,
        until: TimeQuery = None,
        limit: LimitQuery = 50,
        cursor: CursorQuery = None,
    ) -> Response:
        query = DeadQuery(capability, _timestamp(since), _timestamp(until))
        try:
            page = await router.store.query_dead(query, limit=limit, cursor=cursor)
        except ValueError as exc:
            return _problem(400, "invalid_parameter", f"cursor: {exc}")
        items = [
            DeadTask(
                workflow_id=t.workflow_id,
                task_id=t.task_id,
                capability=t.capability,
                attempts=t.attempts,
                max_attempts=t.max_attempts,
                agent=t.agent,
                error=_errors(t.error),
                history=_history(t),
                parked_at=parked_at(t),
            )
            for t in page.items
        ]
        depth = await router.dead_queue_depth()
        queue = QueueDepth(**depth) if depth else None
        return _json(DeadPage(items=items, next_cursor=page.next_cursor, queue=queue))

    @app.get(
        f"{API}/alerts",
        response_model=AlertList,
        tags=["stats"],
        summary="the alerts firing now (threshold rules, escalations, stalled agents)",
        responses={**_UNAVAILABLE},
    )
    async def alerts() -> Response:
        return _json(firing_alerts(router))

    @app.get(
        f"{API}/escalated",
        response_model=EscalatedList,
        tags=["workflows"],
        summary="tasks escalated to an operator, oldest first: resume or abort each",
        responses={**_BAD_PARAMETER, **_UNAVAILABLE},
    )
    async def escalated(limit: LimitQuery = 50) -> Response:
        return _json(await escalated_tasks(router, limit))

    @app.get(
        f"{API}/stats",
        response_model=Stats,
        tags=["stats"],
        summary="a summary for dashboards: counters, agents, queue depths",
        responses={**_UNAVAILABLE},
    )
    async def stats() -> Response:
        return _json(await build_stats(router))

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


async def agent_views(router: Router) -> list[AgentView]:
    """Every agent seen, alive, unhealthy, lost or stopped (``GET /api/v1/agents`` and the dashboard)."""
    return [AgentView(**v) for v in await router.agents()]


async def build_stats(router: Router, views: list[AgentView] | None = None) -> Stats:
    """The summary of ``GET /api/v1/stats`` (the dashboard's live view pushes the same).

    The queues are those of every capability known: of an agent, of a task this router published, of a
    running workflow in the store; so a queue nobody consumes (the agent is gone, or never came) is
    listed with its messages and 0 consumers."""
    if views is None:
        views = await agent_views(router)
    states = [v.state for v in views]
    running = await router.store.query_workflows(
        WorkflowQuery(status=WorkflowStatus.RUNNING), limit=KNOWN_WORKFLOWS
    )
    capabilities = (
        {c for v in views for c in v.capabilities}
        | router.published_capabilities
        | {c for w in running.items for c in w.capabilities}
    )
    depths = await router.queue_depths(capabilities)
    serving = [c for v in views if v.state in ("alive", "unhealthy") for c in v.capabilities]
    dead = await router.dead_queue_depth()
    return Stats(
        namespace=router.ns,
        active=router.active,
        uptime_s=round(time.time() - router.started_at, 3),
        counters=dict(router.stats),
        agents=AgentCounts(
            alive=states.count("alive"),
            unhealthy=states.count("unhealthy"),
            lost=states.count("lost"),
            stopped=states.count("stopped"),
        ),
        queues={c: CapabilityQueue(**d, agents=serving.count(c)) for c, d in depths.items()},
        dead=QueueDepth(**dead) if dead else None,
    )


def firing_alerts(router: Router) -> AlertList:
    """The body of ``GET /api/v1/alerts`` (the dashboard's live view pushes the same)."""
    return AlertList(active=router.active, items=router.alerts.firing_alerts)


async def escalated_tasks(router: Router, limit: int) -> EscalatedList:
    """The body of ``GET /api/v1/escalated``: the first ``limit`` escalated tasks, oldest first."""
    tasks = await router.store.escalated(limit)
    return EscalatedList(
        items=[
            EscalatedTask(
                workflow_id=t.workflow_id,
                task_id=t.task_id,
                capability=t.capability,
                attempts=t.attempts,
                max_attempts=t.max_attempts,
                agent=t.agent,
                error=_errors(t.error),
                escalation=t.escalation,
                created_at=t.created_at,
            )
            for t in tasks
        ]
    )


async def workflow_summaries(router: Router, query: WorkflowQuery, limit: int) -> list[WorkflowSummary]:
    """The first page of ``GET /api/v1/workflows`` for ``query``."""
    page = await router.store.query_workflows(query, limit=limit)
    return [WorkflowSummary(**_summary(w)) for w in page.items]


def _openapi_problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _reasons_by_status() -> dict[int, list[str]]:
    by_status: dict[int, list[str]] = {}
    for reason, status in REJECTION_STATUS.items():
        by_status.setdefault(status, []).append(str(reason))
    return by_status


async def _read_body(request: Request, limit: int) -> bytes | Refusal:
    """The request body, or the ``too_large`` refusal as soon as it is known to be over ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large(f"{int(declared)} bytes", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large(f"more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


# -- the server -------------------------------------------------------------------------------------


def serves_dashboard(app: FastAPI) -> bool:
    """True when ``app`` has the dashboard's page at ``/`` (the router mounts it; tests may not)."""
    return any(getattr(route, "path", None) == "/" for route in app.routes)


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
