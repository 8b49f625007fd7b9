"""Long tasks, the pure parts: when a lease lapses, which events are stale, how the router applies them
(on the in-memory store, no broker), and when a worker gives a leased attempt up."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import Task, load_settings
from fabric.errors import ConfigError
from fabric.metrics import WorkerMetrics
from fabric.policy import RetryPolicy
from fabric.protocol.messages import EventStatus, TaskEvent, TaskStatus
from fabric.router import service
from fabric.router.history import attempt_epoch, lapsed_attempts, trim_history
from fabric.router.service import Router, lease_lapsed
from fabric.router.workflow import Changeset, apply_event, is_stale
from fabric.store import TaskRecord, WorkflowRecord
from fabric.store.memory import MemoryStore
from fabric.telemetry import Telemetry
from fabric.transport.amqp import AmqpConnection
from fabric.worker.attempts import Running
from fabric.worker.execution import Execution
from fabric.worker.lease import Leases, lapsing
from fabric.worker.settlement import Settlement


@pytest.mark.parametrize(
    ("renewed_at", "lease_s", "now", "lapsed"),
    [
        (100.0, 60.0, 100.0, False),
        (100.0, 60.0, 160.0, False),  # exactly the lease: still held
        (100.0, 60.0, 160.5, True),
        (100.0, None, 1e9, False),  # not leased
    ],
)
def test_lease_lapses_only_after_lease_s_unrenewed(
    renewed_at: float, lease_s: float | None, now: float, lapsed: bool
) -> None:
    assert lease_lapsed(renewed_at, lease_s, now) is lapsed


@pytest.mark.parametrize(
    ("attempt", "current", "given_up", "stale"),
    [
        (2, 2, set(), False),
        (3, 2, set(), False),  # a newer attempt (its started may come after a retry's event)
        (1, 2, set(), True),
        (2, 2, {2}, True),  # the router gave attempt 2 up: the task is queued for attempt 3
        (3, 2, {2}, False),
    ],
)
def test_stale_attempts(attempt: int, current: int, given_up: set[int], stale: bool) -> None:
    assert is_stale(attempt, current, given_up) is stale


def test_lapsed_attempts_count_from_the_last_replay() -> None:
    task = TaskRecord(workflow_id="wf", task_id="a", capability="demo.echo")
    lost = {"type": "WorkerLost", "message": "lease"}
    task.history = [
        {"attempt": 1, "agent": "w1", "error": lost, "at": 1.0, "lapsed": True},
        {"attempt": 2, "agent": "w2", "error": {"type": "ValueError", "message": "x"}, "at": 2.0},
    ]
    assert lapsed_attempts(task.history) == {1}
    task.history.append({"attempt": 2, "agent": "operator", "error": {"type": "Replayed", "message": ""}})
    assert lapsed_attempts(task.history) == set(), "after a replay, attempt 1 is a new attempt"
    task.history.append({"attempt": 1, "agent": "w3", "error": lost, "at": 3.0, "lapsed": True})
    assert lapsed_attempts(task.history) == {1}


_LOST = {"type": "WorkerLost", "message": "lease"}


def _operator(kind: str, attempt: int = 1) -> dict[str, Any]:
    return {"attempt": attempt, "agent": "operator", "error": {"type": kind, "message": ""}, "at": 9.0}


@pytest.mark.parametrize("kind", ["Replayed", "Resumed", "Aborted"])
def test_an_operator_entry_starts_a_new_attempt_epoch(kind: str) -> None:
    """A resumed (or replayed) task counts from attempt 1 again: the attempts given up before are not
    this epoch's, so the attempt 1 it runs now is not stale."""
    task = TaskRecord(workflow_id="wf", task_id="a", capability="demo.echo")
    task.history = [{"attempt": 1, "agent": "w1", "error": _LOST, "at": 1.0, "lapsed": True}, _operator(kind)]
    assert attempt_epoch(task.history) == []
    assert lapsed_attempts(task.history) == set()
    assert not is_stale(1, 1, lapsed_attempts(task.history))
    task.history.append({"attempt": 1, "agent": "w2", "error": _LOST, "at": 3.0, "lapsed": True})
    assert attempt_epoch(task.history) == task.history[-1:]
    assert lapsed_attempts(task.history) == {1}


@pytest.mark.parametrize(
    ("operator_at", "dropped"),
    [
        (None, 10),  # no operator entry: the middle one goes
        (20, 10),  # the newest entry is the operator's
        (9, 10),
        (10, 11),  # the operator entry is the middle one: the one after it goes instead
        (11, 10),
    ],
)
def test_trimming_the_history_keeps_the_entry_the_current_epoch_counts_from(
    operator_at: int | None, dropped: int
) -> None:
    history = [{"attempt": i, "agent": "w", "at": float(i)} for i in range(21)]
    if operator_at is not None:
        history[operator_at] = _operator("Resumed", attempt=operator_at)
    trim_history(history)
    assert len(history) == 20
    assert dropped not in [e["attempt"] for e in history]
    if operator_at is not None:
        assert [e["attempt"] for e in history if e["agent"] == "operator"] == [operator_at]


def test_a_short_history_is_not_trimmed() -> None:
    history = [{"attempt": i, "agent": "w"} for i in range(20)]
    trim_history(history)
    assert len(history) == 20


async def test_a_resumed_task_lapsed_before_takes_the_events_of_its_new_attempt_1(
    router: Router,
) -> None:
    """Attempt 1 lapsed and escalated; the operator resumed the task: the new attempt 1 is the task's."""
    task = TaskRecord(workflow_id="wf", task_id="a", capability="c", status=TaskStatus.QUEUED, attempts=0)
    task.history = [
        {"attempt": 1, "agent": "w1", "error": _LOST, "at": 1.0, "lapsed": True},
        _operator("Resumed"),
    ]
    await _stored(router, task)
    verdict, task = await _apply(router, EventStatus.STARTED, 1)
    assert (verdict, task.status, task.attempts) == ("ok", TaskStatus.RUNNING, 1)
    verdict, task = await _apply(router, EventStatus.SUCCEEDED, 1, result="done")
    assert (verdict, task.status, task.result) == ("ok", TaskStatus.SUCCEEDED, "done")


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    store = MemoryStore()
    async with store:
        yield Router(load_settings(namespace="unit"), store=store)


async def _stored(router: Router, task: TaskRecord) -> None:
    workflow = WorkflowRecord(workflow_id="wf", fingerprint="fp", task_count=1, remaining=1)
    await router.store.insert_workflow(workflow, [task])


async def _apply(router: Router, status: EventStatus, attempt: int, **fields: Any) -> tuple[str, TaskRecord]:
    """Apply one event with the workflow core to the stored records, and save what it changed (the
    shell's part, on the in-memory store)."""
    changes = Changeset(
        "wf", await router.store.get_tasks("wf"), await router.store.get_workflow("wf"), complete=True
    )
    event = TaskEvent(
        workflow_id="wf",
        task_id="a",
        attempt=attempt,
        agent_id=f"w{attempt}",
        status=status,
        at=1.0,
        **fields,
    )
    verdict = apply_event(changes, event, redelivered=False, span=None, now=time.time())
    await router.store.save(
        workflows=[changes.workflow] if changes.workflow and changes.workflow_changed else [],
        tasks=list(changes.changed.values()),
    )
    return verdict, (await router.store.get_tasks("wf"))["a"]


async def test_started_with_a_lease_is_held_until_the_attempt_ends(router: Router) -> None:
    await _stored(router, TaskRecord(workflow_id="wf", task_id="a", capability="c", status=TaskStatus.QUEUED))
    _, task = await _apply(router, EventStatus.STARTED, 1)
    assert (task.status, task.lease_s) == (TaskStatus.RUNNING, None)
    _, task = await _apply(router, EventStatus.STARTED, 1, lease_s=60.0)
    assert (task.status, task.lease_s) == (TaskStatus.RUNNING, 60.0)
    assert [t.key for t in await router.store.leased()] == [("wf", "a")]
    _, task = await _apply(router, EventStatus.RETRYING, 1, error={"type": "E", "message": "m"})
    assert (task.status, task.lease_s) == (TaskStatus.RETRYING, None)
    assert await router.store.leased() == []


async def test_outcome_of_a_given_up_attempt_is_history_not_a_completion(router: Router) -> None:
    """The router gave attempt 1 up (lease lapsed) and queued attempt 2; attempt 1 reports late."""
    lost = {"type": "WorkerLost", "message": "lease lapsed"}
    task = TaskRecord(workflow_id="wf", task_id="a", capability="c", status=TaskStatus.QUEUED, attempts=1)
    task.history = [{"attempt": 1, "agent": "w1", "error": lost, "at": 1.0, "lapsed": True}]
    await _stored(router, task)

    verdict, task = await _apply(router, EventStatus.SUCCEEDED, 1, result="late")
    assert verdict == "ok"
    assert (task.status, task.result) == (TaskStatus.QUEUED, None), "not completed by the stale attempt"
    assert task.history[-1]["late"] == "succeeded"
    _, task = await _apply(router, EventStatus.RETRYING, 1, error={"type": "E", "message": "m"})
    assert task.status is TaskStatus.QUEUED, "a stale retry changes nothing"

    _, task = await _apply(router, EventStatus.STARTED, 2)
    assert task.status is TaskStatus.RUNNING
    _, task = await _apply(router, EventStatus.SUCCEEDED, 2, result="on time")
    assert (task.status, task.result, task.attempts) == (TaskStatus.SUCCEEDED, "on time", 2)
    verdict, task = await _apply(router, EventStatus.SUCCEEDED, 2, result="again")
    assert verdict == "late"
    assert task.result == "on time", "one completion recorded"


def test_lease_must_outlive_several_heartbeats() -> None:
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        load_settings(worker={"heartbeat_interval_s": 5, "lease_ttl_s": 10})
    assert load_settings(worker={"heartbeat_interval_s": 5, "lease_ttl_s": 20}).worker.lease_ttl_s == 20


async def test_worker_gives_up_a_lease_unrenewed_for_half_its_ttl() -> None:
    settings = load_settings(namespace="unit", worker={"lease_ttl_s": 60})
    execution = Execution(1, RetryPolicy(), draining=lambda: False, is_cancelled=lambda task: False)
    metrics = WorkerMetrics(
        ["demo.echo"],
        in_flight=lambda: 0,
        concurrency=1,
        overdue_threads=lambda: 0,
        breakers=dict,
        under_lease=lambda: 0,
    )
    settlement = Settlement(
        AmqpConnection("amqp://unused"),
        "unit",
        "unit@host:1",
        telemetry=Telemetry("unit"),
        metrics=metrics,
        capabilities=["demo.echo"],
    )
    leases = Leases(settings.worker, settlement, execution, metrics)
    task = Task(
        input=None,
        upstream={},
        workflow_id="wf",
        task_id="a",
        capability="demo.echo",
        attempt=1,
        max_attempts=3,
        agent_id="unit@host:1",
        timeout_s=3600,
        cancelled=threading.Event(),
    )
    handler = asyncio.ensure_future(asyncio.sleep(3600))
    execution.current[("wf", "a")] = (task, handler)
    running = Running(task, [], leased=True, renewed_at=time.monotonic() - 29)
    assert leases.held(running)
    assert not task.is_cancelled
    running.renewed_at = time.monotonic() - 31
    assert not leases.held(running)
    assert running.forfeited
    assert task.is_cancelled, "a sync handler is told to stop"
    await asyncio.gather(handler, return_exceptions=True)
    assert handler.cancelled(), "an async handler is cancelled"
    running.renewed_at = time.monotonic()
    assert not leases.held(running), "given up for good"


@pytest.mark.parametrize(
    ("renewed_at", "now", "ttl_s", "expected"),
    [(0.0, 29.0, 60.0, False), (0.0, 30.0, 60.0, False), (0.0, 30.5, 60.0, True), (100.0, 90.0, 60.0, False)],
)
def test_a_lease_is_lapsing_after_half_its_ttl_unrenewed(
    renewed_at: float, now: float, ttl_s: float, expected: bool
) -> None:
    assert lapsing(renewed_at, now, ttl_s) is expected


async def test_router_lapses_only_unrenewed_leases_and_escalates_when_asked(router: Router) -> None:
    """A lapsed lease at the last attempt of a task whose on_exhausted is escalate: the task waits for
    an operator (no broker needed: nothing is published but the alert, queued in the background)."""
    task = TaskRecord(
        workflow_id="wf",
        task_id="a",
        capability="c",
        status=TaskStatus.RUNNING,
        attempts=1,
        max_attempts=1,
        agent="w1",
        lease_s=3.0,
        on_exhausted="escalate",
    )
    await _stored(router, task)
    now = time.time()
    router._lease_renewed[("wf", "a", 1)] = now
    assert await router._check_leases(now + 2.9) == 0, "renewed within lease_s"
    assert await router._check_leases(now + 3.5) == 1
    stored = (await router.store.get_tasks("wf"))["a"]
    assert stored.status is TaskStatus.ESCALATED
    assert stored.lease_s is None
    assert stored.escalation is not None
    assert stored.escalation["reason"] == "worker_lost"
    assert [(e["attempt"], e["error"]["type"], e.get("lapsed")) for e in stored.history] == [
        (1, "WorkerLost", True)
    ]
    assert await router.store.leased() == []
    assert await router._check_leases(now + 100) == 0, "handled once"


def test_lease_renewals_forget_the_longest_unrenewed_first(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound, the renewal heard longest ago goes, not every renewal at once (which would let
    live leases lapse early)."""
    monkeypatch.setattr(service, "_MAX_LEASES", 3)
    router._renew_leases([("wf", "a", 1), ("wf", "b", 1), ("wf", "c", 1)], 10.0)
    router._renew_leases([("wf", "a", 1)], 20.0)  # a renewed again: now the most recent
    router._renew_leases([("wf", "d", 1)], 21.0)
    assert router._lease_renewed == {("wf", "c", 1): 10.0, ("wf", "a", 1): 20.0, ("wf", "d", 1): 21.0}
    assert list(router._lease_renewed) == [("wf", "c", 1), ("wf", "a", 1), ("wf", "d", 1)], "oldest first"


async def test_a_partial_lease_check_keeps_the_renewals_it_did_not_read(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more leased tasks than one check reads, renewals of the unread ones are kept."""
    monkeypatch.setattr(service, "_LEASE_CHECK_BATCH", 1)
    for task_id in ("a", "b"):
        await router.store.insert_workflow(
            WorkflowRecord(workflow_id=f"wf-{task_id}", fingerprint="fp", task_count=1, remaining=1),
            [
                TaskRecord(
                    workflow_id=f"wf-{task_id}",
                    task_id=task_id,
                    capability="c",
                    status=TaskStatus.RUNNING,
                    attempts=1,
                    agent="w1",
                    lease_s=60.0,
                )
            ],
        )
    now = time.time()
    router._renew_leases([("wf-a", "a", 1), ("wf-b", "b", 1), ("gone", "x", 1)], now)
    assert await router._check_leases(now + 1) == 0
    assert set(router._lease_renewed) == {("wf-a", "a", 1), ("wf-b", "b", 1), ("gone", "x", 1)}
    monkeypatch.setattr(service, "_LEASE_CHECK_BATCH", 10)
    assert await router._check_leases(now + 1) == 0
    assert set(router._lease_renewed) == {("wf-a", "a", 1), ("wf-b", "b", 1)}, "an ended attempt's goes"
