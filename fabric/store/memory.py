"""In-process state store: the test double, and a fine choice for a throwaway fabric."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Self, TypeVar

from fabric.errors import NotConnectedError, StoreError
from fabric.protocol import codec
from fabric.protocol.messages import TaskStatus, WorkflowStatus
from fabric.store.base import (
    MAX_RECALLED,
    MAX_SAMPLES,
    AgentRecord,
    DeadQuery,
    Page,
    Sample,
    TaskRecord,
    WorkflowQuery,
    WorkflowRecord,
    check_limit,
    check_recalled_limit,
    decode_cursor,
    encode_cursor,
    is_recalled,
    parked_at,
    recalled_after,
    recalled_cursor,
)

_R = TypeVar("_R", TaskRecord, WorkflowRecord, AgentRecord, Sample)


def _copy(record: _R) -> _R:
    """A deep copy made through msgpack, exactly as the durable backends store records.

    So the double behaves like the real thing: a value msgpack cannot encode raises
    :class:`~fabric.errors.ProtocolError`, and tuples come back as lists.
    """
    data: Any = codec.decode(codec.encode(record.to_dict()))
    if not isinstance(data, dict):  # pragma: no cover - to_dict always returns a mapping
        raise StoreError("record did not round-trip as a mapping")
    return type(record).from_dict(data)


class MemoryStore:
    """Keeps copies of records in dictionaries; nothing survives the process.

    Data survives closing and reopening the same instance.

    Example:
        >>> async with MemoryStore() as store:
        ...     await store.list_workflows()
        []
    """

    def __init__(self) -> None:
        self._open = False
        self._workflows: dict[str, WorkflowRecord] = {}
        self._tasks: dict[str, dict[str, TaskRecord]] = {}
        self._agents: dict[str, AgentRecord] = {}
        self._samples: list[Sample] = []

    async def __aenter__(self) -> Self:
        if self._open:
            raise NotConnectedError("MemoryStore is already open")
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise NotConnectedError("MemoryStore is not open: use 'async with MemoryStore()'")

    async def insert_workflow(
        self, workflow: WorkflowRecord, tasks: Sequence[TaskRecord]
    ) -> WorkflowRecord | None:
        self._check_open()
        existing = self._workflows.get(workflow.workflow_id)
        if existing is not None:
            return _copy(existing)
        # Copy everything before storing anything: a record that cannot be encoded writes nothing.
        new_workflow = _copy(workflow)
        new_tasks = {t.task_id: _copy(t) for t in tasks}
        self._workflows[workflow.workflow_id] = new_workflow
        self._tasks[workflow.workflow_id] = new_tasks
        return None

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        self._check_open()
        record = self._workflows.get(workflow_id)
        return None if record is None else _copy(record)

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]:
        self._check_open()
        tasks = self._tasks.get(workflow_id, {})
        wanted = tasks.keys() if task_ids is None else [t for t in task_ids if t in tasks]
        return {t: _copy(tasks[t]) for t in wanted}

    async def save(
        self, *, workflows: Sequence[WorkflowRecord] = (), tasks: Sequence[TaskRecord] = ()
    ) -> None:
        self._check_open()
        # Copy the whole batch first, so a record that cannot be encoded leaves the store untouched.
        new_workflows = [_copy(wf) for wf in workflows]
        new_tasks = [_copy(t) for t in tasks]
        for wf in new_workflows:
            self._workflows[wf.workflow_id] = wf
        for task in new_tasks:
            self._tasks.setdefault(task.workflow_id, {})[task.task_id] = task

    async def mark_dispatched(self, keys: Sequence[tuple[str, str]]) -> None:
        self._check_open()
        # No await in here, so the whole call is atomic. Stored records are private copies: flipping the
        # flag in place leaves every other field exactly as stored.
        for workflow_id, task_id in keys:
            stored = self._tasks.get(workflow_id, {}).get(task_id)
            if stored is not None and stored.status is TaskStatus.QUEUED and not stored.dispatched:
                stored.dispatched = True

    async def recalled(
        self, *, limit: int = MAX_RECALLED, cursor: str | None = None
    ) -> Page[tuple[str, str]]:
        self._check_open()
        check_recalled_limit(limit)
        after = recalled_after(cursor)
        keys = sorted(
            t.key
            for tasks in self._tasks.values()
            for t in tasks.values()
            if is_recalled(t) and (after is None or t.key > after)
        )
        more = len(keys) > limit
        return Page(keys[:limit], recalled_cursor(keys[limit - 1]) if more else None)

    async def undispatched(self, limit: int = 1000) -> list[TaskRecord]:
        self._check_open()
        found = [
            t
            for tasks in self._tasks.values()
            for t in tasks.values()
            if t.status is TaskStatus.QUEUED and not t.dispatched
        ]
        found.sort(key=lambda t: t.created_at)
        return [_copy(t) for t in found[:limit]]

    async def leased(self, limit: int = 1000) -> list[TaskRecord]:
        self._check_open()
        found = [
            t
            for tasks in self._tasks.values()
            for t in tasks.values()
            if t.status is TaskStatus.RUNNING and t.lease_s is not None
        ]
        found.sort(key=lambda t: t.created_at)
        return [_copy(t) for t in found[:limit]]

    async def escalated(self, limit: int = 100) -> list[TaskRecord]:
        self._check_open()
        found = [
            t for tasks in self._tasks.values() for t in tasks.values() if t.status is TaskStatus.ESCALATED
        ]
        found.sort(key=lambda t: t.created_at)
        return [_copy(t) for t in found[: max(limit, 0)]]

    async def unnotified(self, limit: int = 1000) -> list[WorkflowRecord]:
        self._check_open()
        found = [w for w in self._workflows.values() if w.status.terminal and not w.notified]
        found.sort(key=lambda w: w.created_at)
        return [_copy(w) for w in found[:limit]]

    async def list_workflows(
        self, *, status: WorkflowStatus | None = None, limit: int = 100
    ) -> list[WorkflowRecord]:
        self._check_open()
        found = [w for w in self._workflows.values() if status is None or w.status is status]
        found.sort(key=lambda w: w.created_at, reverse=True)
        return [_copy(w) for w in found[:limit]]

    async def query_workflows(
        self, query: WorkflowQuery = WorkflowQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowRecord]:
        self._check_open()
        check_limit(limit)
        after = decode_cursor(cursor, 1) if cursor else None
        found = []
        for w in self._workflows.values():
            position = (w.created_at, (w.workflow_id,))
            if (
                (query.status is None or w.status is query.status)
                and (query.capability is None or query.capability in w.capabilities)
                and (query.since is None or w.created_at >= query.since)
                and (query.until is None or w.created_at < query.until)
                and (after is None or position < after)
            ):
                found.append((position, w))
        found.sort(key=lambda item: item[0], reverse=True)
        page = [_copy(w) for _, w in found[:limit]]
        more = len(found) > limit
        last = page[-1] if page and more else None
        return Page(page, encode_cursor(last.created_at, last.workflow_id) if last else None)

    async def query_dead(
        self, query: DeadQuery = DeadQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[TaskRecord]:
        self._check_open()
        check_limit(limit)
        after = decode_cursor(cursor, 2) if cursor else None
        found = []
        for tasks in self._tasks.values():
            for t in tasks.values():
                if t.status is not TaskStatus.DEAD:
                    continue
                at = parked_at(t)
                position = (at, (t.workflow_id, t.task_id))
                if (
                    (query.capability is None or t.capability == query.capability)
                    and (query.since is None or at >= query.since)
                    and (query.until is None or at < query.until)
                    and (after is None or position < after)
                ):
                    found.append((position, t))
        found.sort(key=lambda item: item[0], reverse=True)
        page = [_copy(t) for _, t in found[:limit]]
        last = page[-1] if page and len(found) > limit else None
        return Page(page, encode_cursor(parked_at(last), *last.key) if last else None)

    async def put_agent(self, agent: AgentRecord) -> None:
        self._check_open()
        self._agents[agent.agent_id] = _copy(agent)

    async def list_agents(self) -> list[AgentRecord]:
        self._check_open()
        return [_copy(a) for _, a in sorted(self._agents.items())]

    async def prune_agents(self, agent_ids: Iterable[str], *, seen_before: float) -> list[str]:
        self._check_open()
        removed = []
        for agent_id in dict.fromkeys(agent_ids):
            agent = self._agents.get(agent_id)
            if agent is not None and agent.last_seen < seen_before:
                del self._agents[agent_id]
                removed.append(agent_id)
        return removed

    async def known_capabilities(self) -> list[str]:
        self._check_open()
        found = {c for w in self._workflows.values() for c in w.capabilities}
        found.update(c for a in self._agents.values() for c in a.capabilities)
        return sorted(found)

    async def add_sample(self, sample: Sample, *, keep_since: float) -> None:
        self._check_open()
        kept = [s for s in self._samples if s.at >= keep_since]
        kept.append(_copy(sample))
        kept.sort(key=lambda s: s.at)
        self._samples = kept[-MAX_SAMPLES:]

    async def samples(self, since: float) -> list[Sample]:
        self._check_open()
        return [_copy(s) for s in self._samples if s.at >= since]

    async def ping(self) -> None:
        self._check_open()
