"""The HTTP API's request and response models: they validate the parameters, shape the answers and
are the schemas of the OpenAPI document (``/api/v1/openapi.json``), so the document cannot drift from
the code. The submission's schema is the wire model :class:`~fabric.protocol.messages.Submission`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fabric.protocol.messages import Alert, ErrorInfo, TaskStatus, WorkflowStatus


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


class HistorySample(BaseModel):
    at: float = Field(description="seconds since the epoch")
    data: dict[str, Any] = Field(
        description="interval_s; moved (task and workflow totals that moved during the interval: "
        "tasks_succeeded, tasks_failed, tasks_retried, tasks_parked, ...); queues (messages by "
        "capability); agents_alive, agents_lost, in_flight"
    )


class History(BaseModel):
    interval_s: float = Field(description="the router's sample interval")
    items: list[HistorySample] = Field(description="oldest first")
