"""The router's REST API (docs/protocol.md §12) as an :class:`~fastapi.APIRouter`, given the router's
parts (:mod:`fabric.router.http.ports`), never the router itself.

``POST /api/v1/workflows`` hands the raw body to :meth:`Intake.submit`, the path AMQP submissions take:
same admission, same rejection codes and details, same idempotency (the ``Idempotency-Key`` header is
the AMQP ``message_id``), and ``202`` only once the workflow is stored and its ready tasks are confirmed
by the broker. Reads come from the state store, in pages with a keyset cursor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response

from fabric.errors import ProtocolError, message_of
from fabric.protocol.messages import (
    CAPABILITY_PATTERN,
    TASK_ID_PATTERN,
    WORKFLOW_ID_PATTERN,
    Accepted,
    Rejected,
    RejectReason,
    WorkflowStatus,
)
from fabric.router.admission import Refusal, too_large
from fabric.router.http.models import (
    AbortRequest,
    AbortResult,
    AgentList,
    AlertList,
    CancelResult,
    DeadPage,
    EscalatedList,
    Problem,
    QueueDepth,
    ResumeRequest,
    ResumeResult,
    Stats,
    WhyAnswer,
    WhyList,
    WorkflowDetail,
    WorkflowPage,
    WorkflowSummary,
)
from fabric.router.http.ports import Parts
from fabric.router.http.views import (
    agent_views,
    build_stats,
    dead_task,
    escalated_tasks,
    firing_alerts,
    json_response,
    problem,
    summary,
    task_detail,
    timestamp,
)
from fabric.store.base import MAX_PAGE, DeadQuery, WorkflowQuery

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


#: Longest Idempotency-Key accepted (an AMQP message_id is a short string of at most 255 bytes).
MAX_IDEMPOTENCY_KEY = 255


def _refused(exc: Exception) -> Response:
    """The answer to a request the router refused: no such workflow or task (``KeyError``) 404, a new
    input over the size limit (``ProtocolError``) 413, a task in the wrong state (``ValueError``) 409."""
    if isinstance(exc, KeyError):
        return problem(404, "not_found", message_of(exc))
    if isinstance(exc, ProtocolError):
        return problem(413, "too_large", str(exc))
    return problem(409, "not_escalated", str(exc))


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


def api_routes(parts: Parts) -> APIRouter:
    """The REST API's routes: workflows, agents, dead letters, alerts, stats."""
    routes = APIRouter()
    store, monitoring = parts.store, parts.monitoring
    max_body_bytes = parts.settings.router.max_body_bytes

    # -- workflows --------------------------------------------------------------------------------

    @routes.post(
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
        parts.intake.count_submission()
        with parts.intake.http_span("POST", f"{API}/workflows", request.headers):
            body = await _read_body(request, max_body_bytes)
            if isinstance(body, Refusal):
                outcome = await parts.intake.refuse(idempotency_key, body, content_type)
            else:
                outcome = await parts.intake.submit(
                    body,
                    content_type,
                    message_id=idempotency_key or None,
                    notify_tasks=fabric_notify_tasks,
                )
        reply = outcome.reply
        if isinstance(reply, Rejected):
            return json_response(reply, REJECTION_STATUS.get(reply.reason, 400))
        headers = {"Location": f"{API}/workflows/{reply.workflow_id}"}
        if outcome.resent:
            headers["Idempotent-Replayed"] = "true"
        return json_response(reply, 202, headers)

    @routes.get(
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
        query = WorkflowQuery(status, capability, timestamp(since), timestamp(until))
        try:
            page = await store.query_workflows(query, limit=limit, cursor=cursor)
        except ValueError as exc:
            return problem(400, "invalid_parameter", f"cursor: {exc}")
        items = [WorkflowSummary(**summary(w)) for w in page.items]
        return json_response(WorkflowPage(items=items, next_cursor=page.next_cursor))

    @routes.get(
        f"{API}/workflows/{{workflow_id}}",
        response_model=WorkflowDetail,
        tags=["workflows"],
        summary="a workflow and its tasks: state, attempts, history, timings, results",
        responses={**_NOT_FOUND, **_UNAVAILABLE},
    )
    async def get_workflow(workflow_id: WorkflowIdPath) -> Response:
        workflow = await store.get_workflow(workflow_id)
        if workflow is None:
            return problem(404, "not_found", f"no workflow {workflow_id!r}")
        tasks = await store.get_tasks(workflow_id)
        counts: dict[str, int] = {}
        for t in tasks.values():
            counts[str(t.status)] = counts.get(str(t.status), 0) + 1
        detail = WorkflowDetail(
            **summary(workflow),
            kind="completed" if workflow.status.terminal else "running",
            counts=counts,
            tasks={t.task_id: task_detail(t) for t in tasks.values()},
        )
        return json_response(detail)

    @routes.get(
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
            answers = await parts.operator.why(workflow_id, task)
        except KeyError as exc:
            return _refused(exc)
        return json_response(WhyList(items=[WhyAnswer(**a) for a in answers]))

    @routes.post(
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
            result = await parts.operator.cancel(workflow_id, task)
        except KeyError as exc:
            return _refused(exc)
        return json_response(CancelResult(**result))

    @routes.post(
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
            result = await parts.operator.resume(workflow_id, task_id, **new)
        except (KeyError, ValueError) as exc:
            return _refused(exc)
        return json_response(ResumeResult(**result))

    @routes.post(
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
            result = await parts.operator.abort(
                workflow_id, task_id, body.reason if body is not None else None
            )
        except (KeyError, ValueError) as exc:
            return _refused(exc)
        return json_response(AbortResult(**result))

    # -- agents, dead letters, stats --------------------------------------------------------------

    @routes.get(
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
        views = await agent_views(monitoring)
        items = [
            v
            for v in views
            if (state is None or v.state == state) and (capability is None or capability in v.capabilities)
        ]
        return json_response(AgentList(items=items))

    @routes.get(
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
        query = DeadQuery(capability, timestamp(since), timestamp(until))
        try:
            page = await store.query_dead(query, limit=limit, cursor=cursor)
        except ValueError as exc:
            return problem(400, "invalid_parameter", f"cursor: {exc}")
        items = [dead_task(t) for t in page.items]
        depth = await monitoring.dead_queue_depth()
        queue = QueueDepth(**depth) if depth else None
        return json_response(DeadPage(items=items, next_cursor=page.next_cursor, queue=queue))

    @routes.get(
        f"{API}/alerts",
        response_model=AlertList,
        tags=["stats"],
        summary="the alerts firing now (threshold rules, escalations, stalled agents)",
        responses={**_UNAVAILABLE},
    )
    async def alerts() -> Response:
        return json_response(firing_alerts(monitoring))

    @routes.get(
        f"{API}/escalated",
        response_model=EscalatedList,
        tags=["workflows"],
        summary="tasks escalated to an operator, oldest first: resume or abort each",
        responses={**_BAD_PARAMETER, **_UNAVAILABLE},
    )
    async def escalated(limit: LimitQuery = 50) -> Response:
        return json_response(await escalated_tasks(store, limit))

    @routes.get(
        f"{API}/stats",
        response_model=Stats,
        tags=["stats"],
        summary="a summary for dashboards: counters, agents, queue depths",
        responses={**_UNAVAILABLE},
    )
    async def stats() -> Response:
        return json_response(await build_stats(monitoring, store))

    return routes
