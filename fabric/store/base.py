"""The state store interface: one Protocol, three backends (memory, SQLite, Redis).

Semantics every backend keeps (the contract suite in ``tests/contract`` checks them all):

* :meth:`StateStore.insert_workflow` is atomic and idempotent: if a workflow with the id exists, nothing
  is written and the existing record is returned, so a redelivered submission never creates a second
  workflow and a crash never leaves half a workflow behind.
* :meth:`StateStore.save` writes a batch of workflow and task records atomically: all or nothing. The
  router computes each state change and commits it in one batch *before* it acks the message that
  caused it, so a crash at any point either loses the whole change (and the message is redelivered) or
  none of it.
* The router is the single writer of workflow and task records (its queues use single active consumer);
  the store therefore needs no compare-and-set: the router reads, decides, and saves. The one exception
  is :meth:`StateStore.mark_dispatched`, below.
* ``leased`` finds tasks ``running`` with ``lease_s`` set (long tasks whose message was acked early), so
  the router can run one again when its worker stops renewing the lease.
* ``undispatched`` finds tasks stored as ready (``queued``) whose publish the broker has not confirmed,
  so a restarted router publishes them again.
* :meth:`StateStore.mark_dispatched` records the broker's publish confirm as a conditional flag flip, not
  a whole-record save: for each ``(workflow_id, task_id)`` it sets ``dispatched`` only if the *stored*
  task is still ``queued`` and not dispatched, and touches no other field, no other task, and no unknown
  key; all keys of one call are written atomically. A confirm can arrive after the task moved on (a
  standby router publishing from a stale copy, or a result that overtook the confirm), and saving the
  publisher's copy then would move the task backwards, e.g. from ``running`` or ``succeeded`` to
  ``queued``. The flip can only ever move a task forwards. Once flipped, the task leaves ``undispatched``.
* A backend may write the flip *behind* (SQLite does, to save a commit per publish): ``mark_dispatched``
  then returns before the flip is durable, but every read through the same store sees it at once, and a
  later ``save`` of the task cancels it (so it never lands on a newer version). Losing it in a crash is
  safe: the task stays undispatched and the router publishes it again at start, a duplicate message that
  at-least-once execution and one terminal state per task already absorb. Nothing is ever flipped
  without the broker's confirm.
* Queries for people (:meth:`StateStore.query_workflows`, :meth:`StateStore.query_dead`) page with an
  opaque keyset cursor, newest first, in a stable order: ``(time, id)`` descending. A new record never
  shifts a page already read, and each record shows up on exactly one page. Each backend answers them
  from an index (SQLite indexes, Redis sorted sets), not by reading every record. A page may hold
  fewer than ``limit`` records while more follow (a backend bounds the work one call does): callers go
  on while ``next_cursor`` is not None.
* Samples (:meth:`StateStore.add_sample`, :meth:`StateStore.samples`) are a small time series for the
  dashboard's trend charts: the router appends one every ``router.sample_interval_s``, and each append
  drops samples older than ``keep_since`` and keeps at most :data:`MAX_SAMPLES`, so the series stays
  bounded whatever runs; a restarted router finds the history its predecessor wrote.
* A task cancelled while copies of its message may still be out (queued, in a delay queue, held by a
  worker) is stored with ``recall`` set. :meth:`StateStore.recalled` lists those, so a worker that
  starts (or reconnects) after the cancel broadcast learns which copies to drop; the router clears the
  flag once a worker reports a copy dropped. Each backend answers it from an index.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, runtime_checkable

from fabric.protocol.messages import TaskStatus, WorkflowStatus

#: Field names of each record class (dataclasses.fields() builds its answer anew on every call, and
#: every store read and write goes through to_dict/from_dict).
_FIELD_NAMES: dict[type, dict[str, None]] = {}


def _field_names(cls: type) -> dict[str, None]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = dict.fromkeys(f.name for f in dataclasses.fields(cls))
    return names


class _Record:
    """to_dict/from_dict for the record dataclasses: enums stored as their text, unknown keys of
    records written by a newer fabric ignored, fields missing from older records defaulted."""

    __slots__ = ()
    #: Fields holding an enum, restored from text by from_dict.
    _enums: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _field_names(type(self))}
        for name in self._enums:
            data[name] = str(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = _field_names(cls)
        record = cls(**{k: v for k, v in data.items() if k in known})
        for name, kind in cls._enums.items():
            setattr(record, name, kind(getattr(record, name)))
        return record


@dataclass(slots=True)
class TaskRecord(_Record):
    """Everything the router knows of one task."""

    _enums: ClassVar[dict[str, Callable[[Any], Any]]] = {"status": TaskStatus}

    workflow_id: str
    task_id: str
    capability: str
    input: Any = None
    depends_on: list[str] = field(default_factory=list)
    dependents: list[str] = field(default_factory=list)
    #: Dependencies that have not succeeded yet; the task is released when this reaches 0.
    pending_deps: int = 0
    priority: int = 5
    timeout_s: float | None = None
    max_attempts: int = 3
    #: ``park`` or ``escalate`` once out of attempts (resolved at admission; sent as a header).
    on_exhausted: str = "park"
    status: TaskStatus = TaskStatus.WAITING
    #: True once the broker confirmed the task message of the current attempt.
    dispatched: bool = False
    attempts: int = 0
    agent: str | None = None
    result: Any = None
    error: dict[str, str] | None = None
    #: One entry per failed attempt: {"attempt", "agent", "error": {"type", "message"}, "at"}, and one
    #: per operator action (agent ``operator``: a replay, a resume with its new ``input`` if any, an abort).
    history: list[dict[str, Any]] = field(default_factory=list)
    #: While ``escalated``: {"reason", "attempt", "agent", "error", "at"} of the escalation.
    escalation: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    queued_at: float | None = None
    #: While ``retrying``: when the next attempt is due.
    retry_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: While ``running`` under a lease (a long task whose message the worker acked): the seconds within
    #: which its worker's heartbeats must renew it, else the router runs the task again. None otherwise.
    lease_s: float | None = None
    #: With tracing: the W3C ``traceparent`` of the span of its latest attempt (from the worker's
    #: events), which its dependents' attempts and its own next attempt link to.
    span: str | None = None
    #: With tracing: the ``traceparent`` of the attempt that released it (its last dependency to
    #: succeed), under which it is published; None for a task ready at submission (the workflow's root).
    release: str | None = None
    #: Set on a task an operator cancelled while copies of its message may still be out (in its
    #: capability queue, a delay queue, or held by a worker): workers drop those copies, unrun.
    #: Cleared when a worker reports a copy dropped (``cancelled``); set again when one shows up.
    recall: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.workflow_id, self.task_id)


@dataclass(slots=True)
class WorkflowRecord(_Record):
    """Everything the router knows of one workflow, except its tasks."""

    _enums: ClassVar[dict[str, Callable[[Any], Any]]] = {"status": WorkflowStatus}

    workflow_id: str
    fingerprint: str
    task_count: int
    remaining: int
    status: WorkflowStatus = WorkflowStatus.RUNNING
    metadata: dict[str, str] = field(default_factory=dict)
    #: Content type of the submission; replies and notifications use the same.
    content_type: str = "application/msgpack"
    reply_to: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: True once the ``completed`` document was published to ``reply_to`` and ``{ns}.notify``.
    notified: bool = False
    #: [reply_to, correlation_id] of clients that resubmitted the workflow while it ran: they get the
    #: ``completed`` document too (bounded; the first submitter is ``reply_to``).
    subscribers: list[list[str]] = field(default_factory=list)
    #: The distinct capabilities of its tasks, sorted (set once at admission; workflows stored by an
    #: older fabric have none and are not found by a capability filter).
    capabilities: list[str] = field(default_factory=list)
    #: W3C trace id (32 hex digits) of the workflow's trace, when tracing was on at admission.
    trace_id: str | None = None
    #: With tracing: the ``traceparent`` of the submission's span, the root of the workflow's trace, so
    #: tasks published later (recovery, replay, resume) stay in it.
    traceparent: str | None = None
    #: True when the submitter asked for task notifications (the ``fabric-notify-tasks`` header).
    notify_tasks: bool = False


@dataclass(slots=True)
class AgentRecord(_Record):
    """An agent as last seen through its heartbeats."""

    agent_id: str
    agent: str
    host: str
    pid: int
    capabilities: list[str]
    concurrency: int
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    health: str = "ok"
    breakers: dict[str, str] = field(default_factory=dict)
    interval_s: float = 5.0
    #: From the heartbeat: since when the agent has had a free slot; None at its concurrency limit.
    free_since: float | None = None
    #: From the heartbeat: per capability, ``ConsumerState`` as a dict (consuming, deliveries, score...).
    consumers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Set by the router's stall watchdog: capability -> ``{"reason", "since", "last_delivery_at"}``
    #: for each capability the agent stopped consuming although its queue has work.
    unhealthy: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


@dataclass(slots=True)
class Sample(_Record):
    """One point of the dashboard's time series: when, and what was measured (a JSON-able mapping)."""

    at: float
    data: dict[str, Any] = field(default_factory=dict)


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    """One page of a query: its records, and the cursor of the next page (None after the last)."""

    items: list[_T]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowQuery:
    """Which workflows :meth:`StateStore.query_workflows` returns. Every condition given must hold.

    ``since``/``until`` bound ``created_at`` (seconds since the epoch): ``since <= created_at < until``.
    ``capability``: workflows with at least one task of it.
    """

    status: WorkflowStatus | None = None
    capability: str | None = None
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class DeadQuery:
    """Which dead (parked) tasks :meth:`StateStore.query_dead` returns.

    ``since``/``until`` bound ``finished_at``, the time the task was parked.
    """

    capability: str | None = None
    since: float | None = None
    until: float | None = None


#: Most records one query page may hold.
MAX_PAGE = 1000

#: Most recalled tasks one :meth:`StateStore.recalled` page may hold.
MAX_RECALLED = 10_000

#: Most samples a store keeps (an hour at one per second); older ones are dropped on append.
MAX_SAMPLES = 3600


def encode_cursor(at: float, *key: str) -> str:
    """An opaque cursor for the position ``(at, *key)`` of a newest-first listing."""
    raw = json.dumps([at, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, parts: int) -> tuple[float, tuple[str, ...]]:
    """The position a cursor of :func:`encode_cursor` holds, with ``parts`` key strings.

    Raises:
        ValueError: the cursor was not made by :func:`encode_cursor` for this kind of listing.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}: not one this API returned") from exc
    if (
        not isinstance(value, list)
        or len(value) != parts + 1
        or not isinstance(value[0], int | float)
        or isinstance(value[0], bool)
        or not all(isinstance(k, str) for k in value[1:])
    ):
        raise ValueError(f"invalid cursor {cursor!r}: not one this API returned")
    return float(value[0]), tuple(value[1:])


def check_recalled_limit(limit: int) -> None:
    """Raise ValueError unless ``1 <= limit <= MAX_RECALLED``."""
    if not 1 <= limit <= MAX_RECALLED:
        raise ValueError(f"limit must be between 1 and {MAX_RECALLED}, not {limit}")


def recalled_cursor(key: tuple[str, str]) -> str:
    """The cursor of a :meth:`StateStore.recalled` page that ended at ``key``."""
    return encode_cursor(0.0, *key)


def recalled_after(cursor: str | None) -> tuple[str, str] | None:
    """The key a :meth:`StateStore.recalled` cursor points after (None for the first page).

    Raises:
        ValueError: not a cursor :func:`recalled_cursor` made.
    """
    if cursor is None:
        return None
    _, (workflow_id, task_id) = decode_cursor(cursor, 2)
    return workflow_id, task_id


def is_recalled(task: TaskRecord) -> bool:
    """True when :meth:`StateStore.recalled` lists ``task``: cancelled, with ``recall`` set."""
    return task.recall and task.status is TaskStatus.CANCELLED


def parked_at(task: TaskRecord) -> float:
    """When a dead task was parked: its ``finished_at`` (``created_at`` if a record lacks it)."""
    return task.finished_at if task.finished_at is not None else task.created_at


def check_limit(limit: int) -> None:
    """Raise ValueError unless ``1 <= limit <= MAX_PAGE``."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")


@runtime_checkable
class StateStore(Protocol):
    """Durable state of workflows, tasks and agents. Use as ``async with store:``."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def insert_workflow(
        self, workflow: WorkflowRecord, tasks: Sequence[TaskRecord]
    ) -> WorkflowRecord | None:
        """Atomically store a new workflow and its tasks.

        Returns:
            None when stored; the existing record (and nothing written) when the id is taken.
        """
        ...

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        """The workflow record, or None."""
        ...

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]:
        """Tasks of a workflow by id: all of them, or only ``task_ids`` (unknown ids are left out)."""
        ...

    async def save(
        self, *, workflows: Sequence[WorkflowRecord] = (), tasks: Sequence[TaskRecord] = ()
    ) -> None:
        """Write these records atomically (all or nothing), replacing the stored versions."""
        ...

    async def mark_dispatched(self, keys: Sequence[tuple[str, str]]) -> None:
        """Record the broker's publish confirm of these tasks, by ``(workflow_id, task_id)``.

        In one atomic write, sets ``dispatched`` to True on each stored task that is still ``queued`` with
        ``dispatched`` False, and removes it from what :meth:`undispatched` returns. Every other task, and
        every other field of the flipped ones, is left exactly as stored (nothing is overwritten with a
        copy the caller holds); unknown keys are ignored; an empty ``keys`` writes nothing. So a confirm
        that arrives after the task went ``running`` or ``succeeded`` never moves it backwards.
        """
        ...

    async def undispatched(self, limit: int = 1000) -> list[TaskRecord]:
        """Tasks that are ``queued`` but whose publish was not confirmed, oldest first."""
        ...

    async def unnotified(self, limit: int = 1000) -> list[WorkflowRecord]:
        """Finished workflows whose ``completed`` document was not yet published."""
        ...

    async def leased(self, limit: int = 1000) -> list[TaskRecord]:
        """Tasks ``running`` under a lease (``lease_s`` set), oldest first: the router watches them."""
        ...

    async def escalated(self, limit: int = 100) -> list[TaskRecord]:
        """Tasks ``escalated`` to an operator (they wait for a resume or an abort), oldest first
        (``created_at``), at most ``limit``."""
        ...

    async def list_workflows(
        self, *, status: WorkflowStatus | None = None, limit: int = 100
    ) -> list[WorkflowRecord]:
        """Workflows, newest first, optionally only those with ``status``."""
        ...

    async def query_workflows(
        self, query: WorkflowQuery = WorkflowQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowRecord]:
        """Workflows matching ``query``, newest first (``created_at``, then id, descending), one page.

        Raises:
            ValueError: ``cursor`` is not one this method returned, or ``limit`` is outside 1..MAX_PAGE.
        """
        ...

    async def query_dead(
        self, query: DeadQuery = DeadQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[TaskRecord]:
        """Tasks whose status is ``dead`` (parked), most recently parked first (``finished_at``, then
        workflow id, then task id, descending), one page.

        Raises:
            ValueError: ``cursor`` is not one this method returned, or ``limit`` is outside 1..MAX_PAGE.
        """
        ...

    async def recalled(
        self, *, limit: int = MAX_RECALLED, cursor: str | None = None
    ) -> Page[tuple[str, str]]:
        """Cancelled tasks with ``recall`` set, as ``(workflow_id, task_id)``, one page in a stable
        order (ascending by key), each on exactly one page of a walk.

        Raises:
            ValueError: ``cursor`` is not one this method returned, or ``limit`` is outside
                1..MAX_RECALLED.
        """
        ...

    async def put_agent(self, agent: AgentRecord) -> None:
        """Insert or replace an agent record."""
        ...

    async def list_agents(self) -> list[AgentRecord]:
        """Every agent seen, by id."""
        ...

    async def prune_agents(self, agent_ids: Iterable[str], *, seen_before: float) -> list[str]:
        """Remove the records of ``agent_ids`` whose ``last_seen`` is before ``seen_before``, atomically
        per record: one a heartbeat refreshed meanwhile stays. Returns the ids removed (unknown ids are
        ignored)."""
        ...

    async def known_capabilities(self) -> list[str]:
        """Every capability the store knows of, sorted: those of stored workflows' tasks (recorded at
        admission) and those of every agent seen. ``fabric topology delete`` finds the capability
        queues it must delete through it."""
        ...

    async def add_sample(self, sample: Sample, *, keep_since: float) -> None:
        """Append a sample of the time series, and drop every sample older than ``keep_since`` and all
        but the newest :data:`MAX_SAMPLES` (in the same write)."""
        ...

    async def samples(self, since: float) -> list[Sample]:
        """Samples taken at or after ``since``, oldest first (at most :data:`MAX_SAMPLES`)."""
        ...

    async def ping(self) -> None:
        """Raise StoreError unless the store answers and can write."""
        ...
