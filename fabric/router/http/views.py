"""The answers of the HTTP API, built from the router's parts: records of the store turned into the
response models, and the summaries the API and the dashboard's live view share (one data path)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import Response
from pydantic import BaseModel

from fabric.protocol import codec
from fabric.protocol.messages import ErrorInfo, WorkflowStatus
from fabric.router.http.models import (
    AgentCounts,
    AgentView,
    AlertList,
    CapabilityQueue,
    DeadTask,
    EscalatedList,
    EscalatedTask,
    HistoryEntry,
    Problem,
    QueueDepth,
    Stats,
    TaskDetail,
    WorkflowSummary,
)
from fabric.router.http.ports import Monitoring, ReadStore
from fabric.store.base import TaskRecord, WorkflowQuery, WorkflowRecord, parked_at

#: Running workflows whose capabilities ``/stats`` looks at (beside the agents' and the published ones).
KNOWN_WORKFLOWS = 200


def json_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response through fabric's codec (bytes become base64 text, as in JSON replies on AMQP)."""
    body = codec.encode(model.model_dump(mode="python"), codec.JSON)
    return Response(body, status, headers=headers, media_type="application/json")


def problem(status: int, error: str, detail: str, errors: list[dict[str, Any]] | None = None) -> Response:
    return json_response(Problem(error=error, detail=detail, errors=errors or []), status)


def timestamp(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def error_info(raw: dict[str, str] | None) -> ErrorInfo | None:
    return ErrorInfo(type=str(raw.get("type", "")), message=str(raw.get("message", ""))) if raw else None


def history_entries(task: TaskRecord) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            attempt=int(h.get("attempt") or 0),
            agent=h.get("agent"),
            error=error_info(h.get("error")),
            at=h.get("at"),
        )
        for h in task.history
    ]


def summary(w: WorkflowRecord) -> dict[str, Any]:
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


def task_detail(t: TaskRecord) -> TaskDetail:
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
        error=error_info(t.error),
        history=history_entries(t),
        created_at=t.created_at,
        queued_at=t.queued_at,
        started_at=t.started_at,
        finished_at=t.finished_at,
        retry_at=t.retry_at,
        escalation=t.escalation,
    )


def dead_task(t: TaskRecord) -> DeadTask:
    return DeadTask(
        workflow_id=t.workflow_id,
        task_id=t.task_id,
        capability=t.capability,
        attempts=t.attempts,
        max_attempts=t.max_attempts,
        agent=t.agent,
        error=error_info(t.error),
        history=history_entries(t),
        parked_at=parked_at(t),
    )


async def agent_views(monitoring: Monitoring) -> list[AgentView]:
    """Every agent seen, alive, unhealthy, lost or stopped (``GET /api/v1/agents`` and the dashboard)."""
    return [AgentView(**v) for v in await monitoring.agents()]


async def build_stats(
    monitoring: Monitoring, store: ReadStore, views: list[AgentView] | None = None
) -> Stats:
    """The summary of ``GET /api/v1/stats`` (the dashboard's live view pushes the same).

    The queues are those of every capability known: of an agent, of a task this router published, of a
    running workflow in the store; so a queue nobody consumes (the agent is gone, or never came) is
    listed with its messages and 0 consumers."""
    if views is None:
        views = await agent_views(monitoring)
    states = [v.state for v in views]
    running = await store.query_workflows(WorkflowQuery(status=WorkflowStatus.RUNNING), limit=KNOWN_WORKFLOWS)
    capabilities = (
        {c for v in views for c in v.capabilities}
        | monitoring.published_capabilities
        | {c for w in running.items for c in w.capabilities}
    )
    depths = await monitoring.queue_depths(capabilities)
    serving = [c for v in views if v.state in ("alive", "unhealthy") for c in v.capabilities]
    dead = await monitoring.dead_queue_depth()
    return Stats(
        namespace=monitoring.ns,
        active=monitoring.active,
        uptime_s=round(time.time() - monitoring.started_at, 3),
        counters=monitoring.counters(),
        agents=AgentCounts(
            alive=states.count("alive"),
            unhealthy=states.count("unhealthy"),
            lost=states.count("lost"),
            stopped=states.count("stopped"),
        ),
        queues={c: CapabilityQueue(**d, agents=serving.count(c)) for c, d in depths.items()},
        dead=QueueDepth(**dead) if dead else None,
    )


def firing_alerts(monitoring: Monitoring) -> AlertList:
    """The body of ``GET /api/v1/alerts`` (the dashboard's live view pushes the same)."""
    return AlertList(active=monitoring.active, items=monitoring.firing_alerts())


async def escalated_tasks(store: ReadStore, limit: int) -> EscalatedList:
    """The body of ``GET /api/v1/escalated``: the first ``limit`` escalated tasks, oldest first."""
    tasks = await store.escalated(limit)
    return EscalatedList(
        items=[
            EscalatedTask(
                workflow_id=t.workflow_id,
                task_id=t.task_id,
                capability=t.capability,
                attempts=t.attempts,
                max_attempts=t.max_attempts,
                agent=t.agent,
                error=error_info(t.error),
                escalation=t.escalation,
                created_at=t.created_at,
            )
            for t in tasks
        ]
    )


async def workflow_summaries(store: ReadStore, query: WorkflowQuery, limit: int) -> list[WorkflowSummary]:
    """The first page of ``GET /api/v1/workflows`` for ``query``."""
    page = await store.query_workflows(query, limit=limit)
    return [WorkflowSummary(**summary(w)) for w in page.items]
