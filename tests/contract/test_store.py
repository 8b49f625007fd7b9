"""The StateStore contract (fabric/store/base.py), checked against every backend.

Every test here but the last few runs once per backend (memory, sqlite, redis) through the ``backend``
and ``store`` fixtures of ``conftest.py``. Times are explicit ``created_at`` values, never the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio.client import Pipeline

from fabric.errors import NotConnectedError, ProtocolError, StoreError
from fabric.protocol.messages import TaskStatus, WorkflowStatus
from fabric.store import AgentRecord, StateStore, TaskRecord, WorkflowRecord
from fabric.store.redis import RedisStore
from fabric.store.sqlite import SqliteStore

from ..conftest import eventually
from .conftest import Backend, unreachable

#: A value using every msgpack type a task input or result may carry, nested.
NESTED: dict[str, Any] = {
    "text": "héllo ✓",
    "empty": "",
    "int": -(2**40),
    "float": 2.5,
    "bool": True,
    "none": None,
    "bytes": b"\x00\xffraw",
    "list": [1, [2, [3, {"deep": ["er"]}]], {}],
    "map": {"nested": {"a": [None, False, 0.125]}},
}


def workflow(
    workflow_id: str = "wf-1",
    *,
    created_at: float = 1_000.0,
    status: WorkflowStatus = WorkflowStatus.RUNNING,
    notified: bool = False,
    task_count: int = 2,
    **fields: Any,
) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=workflow_id,
        fingerprint=fields.pop("fingerprint", f"fp-{workflow_id}"),
        task_count=task_count,
        remaining=fields.pop("remaining", task_count),
        status=status,
        created_at=created_at,
        notified=notified,
        **fields,
    )


def task(
    task_id: str,
    workflow_id: str = "wf-1",
    *,
    created_at: float = 1_000.0,
    status: TaskStatus = TaskStatus.QUEUED,
    dispatched: bool = False,
    **fields: Any,
) -> TaskRecord:
    return TaskRecord(
        workflow_id=workflow_id,
        task_id=task_id,
        capability=fields.pop("capability", "demo.echo"),
        created_at=created_at,
        status=status,
        dispatched=dispatched,
        **fields,
    )


def keys(tasks: list[TaskRecord]) -> list[tuple[str, str]]:
    return [t.key for t in tasks]


def ids(workflows: list[WorkflowRecord]) -> list[str]:
    return [w.workflow_id for w in workflows]


# -- insert_workflow / get_workflow / get_tasks ------------------------------------------------------------


async def test_insert_then_get_round_trips_every_field(store: StateStore) -> None:
    wf = WorkflowRecord(
        workflow_id="wf-1",
        fingerprint="sha256:abc",
        task_count=2,
        remaining=1,
        status=WorkflowStatus.RUNNING,
        metadata={"team": "search", "ünï": "cödé"},
        content_type="application/json",
        reply_to="amq.rabbitmq.reply-to.g1h2",
        correlation_id="corr-7",
        message_id="msg-7",
        created_at=1_234.5,
        finished_at=None,
        notified=False,
        capabilities=["http.fetch"],
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    first = TaskRecord(
        workflow_id="wf-1",
        task_id="fetch",
        capability="http.fetch",
        input=NESTED,
        depends_on=[],
        dependents=["sum"],
        pending_deps=0,
        priority=9,
        timeout_s=12.5,
        max_attempts=7,
        status=TaskStatus.SUCCEEDED,
        dispatched=True,
        attempts=2,
        agent="agent-a/1",
        result={"echo": NESTED, "n": [1, 2, 3]},
        error={"type": "TimeoutError", "message": "took 12.5 s"},
        created_at=1_234.5,
        queued_at=1_234.6,
        started_at=1_235.0,
        finished_at=1_240.25,
        span="00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
        release="00-4bf92f3577b34da6a3ce929d0e0e4736-a3ce929d0e0e4736-01",
    )
    second = task("sum", depends_on=["fetch"], pending_deps=1, status=TaskStatus.WAITING, input=[1, 2])

    assert await store.insert_workflow(wf, [first, second]) is None

    stored = await store.get_workflow("wf-1")
    assert stored == wf
    assert stored is not None
    assert type(stored.status) is WorkflowStatus
    tasks = await store.get_tasks("wf-1")
    assert tasks == {"fetch": first, "sum": second}
    assert {type(t.status) for t in tasks.values()} == {TaskStatus}
    assert tasks["fetch"].input["bytes"] == b"\x00\xffraw"


async def test_an_escalated_task_round_trips_and_keeps_its_workflow_open(store: StateStore) -> None:
    """An escalated task waits for an operator: stored as such (with its escalation and the operator's
    history entries), neither ready to publish nor finishing its workflow."""
    await store.insert_workflow(
        workflow(task_count=2), [task("review"), task("after", status=TaskStatus.WAITING)]
    )
    escalated = task(
        "review",
        status=TaskStatus.ESCALATED,
        dispatched=True,
        attempts=3,
        agent="agent-a/1",
        on_exhausted="escalate",
        error={"type": "RuntimeError", "message": "boom"},
        escalation={
            "reason": "exhausted",
            "attempt": 3,
            "agent": "agent-a/1",
            "error": {"type": "RuntimeError", "message": "boom"},
            "at": 1_010.5,
        },
        history=[
            {
                "attempt": 1,
                "agent": "operator",
                "error": {"type": "Resumed", "message": "m"},
                "at": 1.0,
                "input": NESTED,
            },
            {
                "attempt": 3,
                "agent": "agent-a/1",
                "error": {"type": "RuntimeError", "message": "boom"},
                "at": 2.0,
            },
        ],
    )
    await store.save(tasks=[escalated])

    stored = (await store.get_tasks("wf-1", ["review"]))["review"]
    assert stored == escalated
    assert stored.status is TaskStatus.ESCALATED
    assert stored.history[0]["input"]["bytes"] == b"\x00\xffraw"
    assert await store.undispatched() == []
    assert await store.unnotified() == []
    assert [w.workflow_id for w in await store.list_workflows(status=WorkflowStatus.RUNNING)] == ["wf-1"]

    # Resumed: queued again from attempt 1, ready to publish.
    resumed = task("review", status=TaskStatus.QUEUED, on_exhausted="escalate", history=stored.history)
    await store.save(tasks=[resumed])
    assert [t.task_id for t in await store.undispatched()] == ["review"]
    assert (await store.get_tasks("wf-1", ["review"]))["review"].escalation is None


async def test_agent_round_trips_every_field(store: StateStore) -> None:
    agent = AgentRecord(
        agent_id="a-1",
        agent="demo",
        host="box-1",
        pid=4242,
        capabilities=["demo.echo", "demo.sum"],
        concurrency=8,
        in_flight=3,
        processed=100,
        failed=2,
        health="degraded",
        breakers={"demo.echo": "open", "demo.sum": "closed"},
        first_seen=10.0,
        last_seen=20.5,
    )
    await store.put_agent(agent)
    assert await store.list_agents() == [agent]


async def test_stored_records_are_copies(store: StateStore) -> None:
    wf = workflow(metadata={"k": "v"})
    t = task("a", input={"list": [1]})
    await store.insert_workflow(wf, [t])

    # Mutating what was passed in, or what was read, never changes what is stored.
    wf.metadata["k"] = "changed"
    t.input["list"].append(2)
    read = await store.get_tasks("wf-1")
    read["a"].input["list"].append(3)

    stored_wf = await store.get_workflow("wf-1")
    assert stored_wf is not None
    assert stored_wf.metadata == {"k": "v"}
    assert (await store.get_tasks("wf-1"))["a"].input == {"list": [1]}


async def test_values_come_back_as_msgpack_gives_them(store: StateStore) -> None:
    # Tuples are not a msgpack type: every backend (the in-memory double included) returns lists, so code
    # tested against memory behaves the same against SQLite and Redis.
    await store.insert_workflow(workflow(), [task("a", input=(1, (2, 3)))])
    assert (await store.get_tasks("wf-1"))["a"].input == [1, [2, 3]]


async def test_get_workflow_of_unknown_id_is_none(store: StateStore) -> None:
    assert await store.get_workflow("nope") is None


async def test_insert_of_existing_id_writes_nothing_and_returns_existing(store: StateStore) -> None:
    original = workflow(fingerprint="fp-original")
    original_tasks = [task("a"), task("b", status=TaskStatus.WAITING)]
    assert await store.insert_workflow(original, original_tasks) is None

    again = workflow(fingerprint="fp-other", task_count=3, created_at=2_000.0)
    existing = await store.insert_workflow(
        again, [task("a", capability="other.cap"), task("c"), task("d", created_at=1.0)]
    )

    assert existing == original
    assert await store.get_workflow("wf-1") == original
    assert await store.get_tasks("wf-1") == {t.task_id: t for t in original_tasks}
    # The rejected tasks did not reach the indexes either.
    assert keys(await store.undispatched()) == [("wf-1", "a")]
    assert ids(await store.list_workflows()) == ["wf-1"]


async def test_concurrent_inserts_of_one_id_store_exactly_one(store: StateStore) -> None:
    candidates = [workflow(fingerprint=f"fp-{n}", task_count=1) for n in range(5)]
    results = await asyncio.gather(
        *(store.insert_workflow(wf, [task(f"t{n}")]) for n, wf in enumerate(candidates))
    )

    winners = [n for n, result in enumerate(results) if result is None]
    assert len(winners) == 1
    winner = candidates[winners[0]]
    assert all(result == winner for result in results if result is not None)
    assert await store.get_workflow("wf-1") == winner
    assert list(await store.get_tasks("wf-1")) == [f"t{winners[0]}"]


async def test_insert_is_all_or_nothing_for_concurrent_readers(store: StateStore) -> None:
    tasks = [task(f"t{n:04}", created_at=float(n)) for n in range(1000)]
    seen: list[tuple[bool, int]] = []

    async def read_repeatedly() -> None:
        for _ in range(20):
            found = await store.get_workflow("wf-1")
            seen.append((found is not None, len(await store.get_tasks("wf-1"))))

    await asyncio.gather(store.insert_workflow(workflow(task_count=1000), tasks), read_repeatedly())

    # A reader may see no workflow yet (with or without its tasks, as the insert may commit between two
    # reads), but never a workflow without all of its tasks.
    assert all(count == 1000 for visible, count in seen if visible)
    assert len(await store.get_tasks("wf-1")) == 1000


async def test_insert_with_an_unencodable_value_writes_nothing(store: StateStore) -> None:
    with pytest.raises(ProtocolError):
        await store.insert_workflow(workflow(), [task("a"), task("b", input={"x": object()})])

    assert await store.get_workflow("wf-1") is None
    assert await store.get_tasks("wf-1") == {}
    assert await store.undispatched() == []


async def test_get_tasks_all_subset_and_unknown(store: StateStore) -> None:
    await store.insert_workflow(workflow(task_count=3), [task("a"), task("b"), task("c")])

    assert set(await store.get_tasks("wf-1")) == {"a", "b", "c"}
    assert set(await store.get_tasks("wf-1", ["a", "c"])) == {"a", "c"}
    assert set(await store.get_tasks("wf-1", iter(["b", "b", "nope"]))) == {"b"}
    assert await store.get_tasks("wf-1", ["nope"]) == {}
    assert await store.get_tasks("wf-1", []) == {}
    assert await store.get_tasks("unknown-workflow") == {}
    assert await store.get_tasks("unknown-workflow", ["a"]) == {}


async def test_tasks_of_workflows_are_kept_apart(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1", task_count=1), [task("a", "wf-1", input=1)])
    await store.insert_workflow(workflow("wf-2", task_count=1), [task("a", "wf-2", input=2)])

    assert (await store.get_tasks("wf-1"))["a"].input == 1
    assert (await store.get_tasks("wf-2", ["a"]))["a"].input == 2


async def test_large_workflow_insert_and_chunked_get(store: StateStore) -> None:
    tasks = [task(f"t{n:04}", created_at=float(n), input={"n": n}) for n in range(1000)]
    assert await store.insert_workflow(workflow(task_count=1000), tasks) is None

    assert len(await store.get_tasks("wf-1")) == 1000
    # 600 ids cross SQLite's chunks of 500 bound parameters; unknown ids mixed in are left out.
    wanted = [f"t{n:04}" for n in range(0, 1200, 2)]
    found = await store.get_tasks("wf-1", wanted)
    assert sorted(found) == [f"t{n:04}" for n in range(0, 1000, 2)]
    assert all(found[t].input == {"n": int(t[1:])} for t in found)
    assert keys(await store.undispatched(limit=1000)) == [("wf-1", t.task_id) for t in tasks]


# -- save ----------------------------------------------------------------------------------------------


async def test_save_replaces_whole_records(store: StateStore) -> None:
    await store.insert_workflow(
        workflow(),
        [task("a", error={"type": "E", "message": "m"}, agent="x", result=[1]), task("b")],
    )

    new_a = task("a", status=TaskStatus.RUNNING, dispatched=True, attempts=2, input={"new": True})
    new_wf = workflow(remaining=0, metadata={"after": "save"}, finished_at=1_500.0)
    await store.save(workflows=[new_wf], tasks=[new_a])

    assert await store.get_workflow("wf-1") == new_wf
    tasks = await store.get_tasks("wf-1")
    # Fields left at their defaults in the new version are reset, not merged with the old one.
    assert tasks["a"] == new_a
    assert tasks["a"].error is None
    assert tasks["a"].agent is None
    assert tasks["a"].result is None
    assert tasks["b"] == task("b")


async def test_save_writes_workflows_and_tasks_together(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1"), [task("a", "wf-1"), task("b", "wf-1")])
    await store.insert_workflow(workflow("wf-2", task_count=1), [task("a", "wf-2")])

    done = workflow("wf-1", status=WorkflowStatus.SUCCEEDED, remaining=0, finished_at=2_000.0)
    await store.save(
        workflows=[done, workflow("wf-2", remaining=0)],
        tasks=[
            task("a", "wf-1", status=TaskStatus.SUCCEEDED, result=1),
            task("b", "wf-1", status=TaskStatus.SUCCEEDED, result=2),
            task("a", "wf-2", status=TaskStatus.RUNNING, dispatched=True),
        ],
    )

    assert await store.get_workflow("wf-1") == done
    assert {t.result for t in (await store.get_tasks("wf-1")).values()} == {1, 2}
    wf2 = await store.get_workflow("wf-2")
    assert wf2 is not None
    assert wf2.remaining == 0
    assert (await store.get_tasks("wf-2"))["a"].status is TaskStatus.RUNNING


async def test_save_with_an_unencodable_value_writes_nothing(store: StateStore) -> None:
    await store.insert_workflow(workflow(), [task("a"), task("b")])
    before_wf, before_tasks = await store.get_workflow("wf-1"), await store.get_tasks("wf-1")

    with pytest.raises(ProtocolError):
        await store.save(
            workflows=[workflow(status=WorkflowStatus.FAILED)],
            tasks=[task("a", status=TaskStatus.FAILED), task("b", result=object())],
        )

    assert await store.get_workflow("wf-1") == before_wf
    assert await store.get_tasks("wf-1") == before_tasks
    assert ids(await store.unnotified()) == []
    assert keys(await store.undispatched()) == [("wf-1", "a"), ("wf-1", "b")]


async def test_save_of_nothing_is_a_no_op(store: StateStore) -> None:
    await store.save()
    await store.save(workflows=[], tasks=[])
    assert await store.list_workflows() == []


async def test_save_inserts_records_that_do_not_exist_yet(store: StateStore) -> None:
    await store.insert_workflow(workflow(task_count=1), [task("a")])
    await store.save(tasks=[task("late", status=TaskStatus.WAITING)])
    assert set(await store.get_tasks("wf-1")) == {"a", "late"}


async def test_concurrent_saves_all_land(store: StateStore) -> None:
    await asyncio.gather(
        *(
            store.save(workflows=[workflow(f"wf-{n}", created_at=float(n))], tasks=[task("a", f"wf-{n}")])
            for n in range(20)
        ),
        store.put_agent(AgentRecord("a-1", "demo", "host", 1, ["demo.echo"], 1)),
    )
    assert len(await store.list_workflows(limit=100)) == 20
    assert len(await store.undispatched()) == 20
    assert len(await store.list_agents()) == 1


# -- undispatched --------------------------------------------------------------------------------------


async def test_undispatched_is_queued_and_unconfirmed_oldest_first(store: StateStore) -> None:
    await store.insert_workflow(
        workflow("wf-1", task_count=5),
        [
            task("q3", "wf-1", created_at=30.0),
            task("q1", "wf-1", created_at=10.0),
            task("confirmed", "wf-1", created_at=5.0, dispatched=True),
            task("waiting", "wf-1", created_at=1.0, status=TaskStatus.WAITING),
            task("running", "wf-1", created_at=2.0, status=TaskStatus.RUNNING),
        ],
    )
    await store.insert_workflow(
        workflow("wf-2", task_count=2),
        [task("q2", "wf-2", created_at=20.0), task("done", "wf-2", status=TaskStatus.SUCCEEDED)],
    )

    assert keys(await store.undispatched()) == [("wf-1", "q1"), ("wf-2", "q2"), ("wf-1", "q3")]
    assert keys(await store.undispatched(limit=2)) == [("wf-1", "q1"), ("wf-2", "q2")]
    found = await store.undispatched(limit=1)
    assert found == [task("q1", "wf-1", created_at=10.0)]


async def test_undispatched_follows_saves(store: StateStore) -> None:
    await store.insert_workflow(
        workflow(task_count=3),
        [task("a", created_at=1.0), task("b", created_at=2.0), task("c", created_at=3.0, dispatched=True)],
    )

    # The broker confirmed a's publish: the router saves dispatched=True.
    await store.save(tasks=[task("a", created_at=1.0, dispatched=True)])
    assert keys(await store.undispatched()) == [("wf-1", "b")]

    # b starts running; c is queued again for a retry, its new publish not yet confirmed.
    await store.save(
        tasks=[
            task("b", created_at=2.0, status=TaskStatus.RUNNING, dispatched=True),
            task("c", created_at=3.0),
        ]
    )
    assert keys(await store.undispatched()) == [("wf-1", "c")]

    # A waiting task released by its dependencies enters the list, in created_at order.
    await store.save(tasks=[task("d", created_at=0.5, status=TaskStatus.WAITING)])
    await store.save(tasks=[task("d", created_at=0.5)])
    assert keys(await store.undispatched()) == [("wf-1", "d"), ("wf-1", "c")]


async def test_last_version_of_a_task_in_one_batch_wins(store: StateStore) -> None:
    await store.insert_workflow(
        workflow(task_count=2), [task("a", status=TaskStatus.WAITING), task("b", created_at=2_000.0)]
    )
    await store.save(tasks=[task("a"), task("a", dispatched=True)])
    assert keys(await store.undispatched()) == [("wf-1", "b")]
    # The older task "a" does not hold on to a place within the limit either.
    assert keys(await store.undispatched(limit=1)) == [("wf-1", "b")]
    assert (await store.get_tasks("wf-1"))["a"].dispatched is True

    await store.save(tasks=[task("a", dispatched=True), task("a")])
    assert keys(await store.undispatched()) == [("wf-1", "a"), ("wf-1", "b")]


# -- mark_dispatched -----------------------------------------------------------------------------------


async def test_mark_dispatched_flips_only_queued_and_undispatched(store: StateStore) -> None:
    queued = TaskRecord(
        workflow_id="wf-1",
        task_id="queued",
        capability="http.fetch",
        input=NESTED,
        dependents=["other"],
        priority=9,
        timeout_s=12.5,
        max_attempts=7,
        status=TaskStatus.QUEUED,
        attempts=2,
        error={"type": "TimeoutError", "message": "attempt 1 timed out"},
        created_at=10.0,
        queued_at=11.5,
    )
    others = [
        task("confirmed", dispatched=True, created_at=1.0),
        task("waiting", status=TaskStatus.WAITING),
        task("running", status=TaskStatus.RUNNING),
        task("running-confirmed", status=TaskStatus.RUNNING, dispatched=True, agent="a-1"),
        task("succeeded", status=TaskStatus.SUCCEEDED, result=NESTED),
        task("retrying", status=TaskStatus.RETRYING, attempts=1),
        task("failed", status=TaskStatus.FAILED, error={"type": "E", "message": "m"}),
        task("not-named", created_at=20.0),
    ]
    await store.insert_workflow(workflow(task_count=len(others) + 1), [queued, *others])

    await store.mark_dispatched(
        [
            *[("wf-1", t.task_id) for t in [queued, *others] if t.task_id != "not-named"],
            ("wf-1", "unknown-task"),
            ("unknown-workflow", "queued"),
        ]
    )

    stored = await store.get_tasks("wf-1")
    # Only the flag of the queued, unconfirmed task changed; every other field is as stored.
    assert stored["queued"] == TaskRecord.from_dict({**queued.to_dict(), "dispatched": True})
    # Every other task, including the queued one that was not named, is exactly as stored.
    assert {t: r for t, r in stored.items() if t != "queued"} == {t.task_id: t for t in others}
    assert keys(await store.undispatched()) == [("wf-1", "not-named")]
    assert keys(await store.undispatched(limit=1)) == [("wf-1", "not-named")]
    # Unknown keys created nothing.
    assert set(stored) == {"queued", *(t.task_id for t in others)}
    assert await store.get_tasks("unknown-workflow") == {}
    assert await store.get_workflow("unknown-workflow") is None


@pytest.mark.parametrize(
    "moved_on",
    [
        task("a", status=TaskStatus.RUNNING, agent="a-1", attempts=1, started_at=1_001.0),
        task("a", status=TaskStatus.RUNNING, dispatched=True, agent="a-1", attempts=1),
        task("a", status=TaskStatus.SUCCEEDED, result={"ok": NESTED}, finished_at=1_002.0),
        task("a", status=TaskStatus.SUCCEEDED, dispatched=True, result=[1, 2]),
        task("a", status=TaskStatus.WAITING, attempts=1),
    ],
    ids=["running", "running-confirmed", "succeeded", "succeeded-confirmed", "waiting"],
)
async def test_mark_dispatched_never_moves_a_task_backwards(store: StateStore, moved_on: TaskRecord) -> None:
    # The publisher's copy of "a" is queued and unconfirmed...
    await store.insert_workflow(workflow(task_count=1), [task("a")])
    stale = (await store.get_tasks("wf-1"))["a"]
    assert stale.status is TaskStatus.QUEUED
    # ...but before the confirm arrives the task moves on (its result overtook the confirm, or another
    # router's copy was newer).
    await store.save(tasks=[moved_on])

    await store.mark_dispatched([stale.key])

    assert (await store.get_tasks("wf-1")) == {"a": moved_on}
    assert await store.undispatched() == []


async def test_mark_dispatched_keeps_the_stored_version_not_the_publishers(store: StateStore) -> None:
    await store.insert_workflow(workflow(task_count=1), [task("a", input={"v": 1})])
    # Still queued and unconfirmed, but changed since the publisher read it.
    newer = task("a", input={"v": 2}, attempts=1, queued_at=1_005.0)
    await store.save(tasks=[newer])

    await store.mark_dispatched([("wf-1", "a")])

    newer.dispatched = True
    assert await store.get_tasks("wf-1") == {"a": newer}


async def test_mark_dispatched_across_workflows_in_one_call(store: StateStore) -> None:
    await store.insert_workflow(
        workflow("wf-1", task_count=2), [task("a", "wf-1", created_at=1.0), task("b", "wf-1", created_at=2.0)]
    )
    await store.insert_workflow(
        workflow("wf-2", task_count=2),
        [task("a", "wf-2", created_at=3.0), task("b", "wf-2", created_at=4.0, status=TaskStatus.RUNNING)],
    )
    await store.insert_workflow(workflow("wf-3", task_count=1), [task("a", "wf-3", created_at=5.0)])

    await store.mark_dispatched(
        [("wf-2", "a"), ("wf-1", "a"), ("wf-2", "b"), ("wf-3", "a"), ("wf-1", "a"), ("wf-9", "a")]
    )

    assert keys(await store.undispatched()) == [("wf-1", "b")]
    # The flipped tasks left the index too: older than b, they do not hold on to a place within the limit.
    assert keys(await store.undispatched(limit=1)) == [("wf-1", "b")]
    assert {t: r.dispatched for t, r in (await store.get_tasks("wf-1")).items()} == {"a": True, "b": False}
    assert (await store.get_tasks("wf-2"))["a"].dispatched is True
    assert (await store.get_tasks("wf-2"))["b"] == task(
        "b", "wf-2", created_at=4.0, status=TaskStatus.RUNNING
    )
    assert (await store.get_tasks("wf-3"))["a"].dispatched is True


async def test_mark_dispatched_of_nothing_is_a_no_op(store: StateStore) -> None:
    await store.mark_dispatched([])
    tasks = [task("a", created_at=1.0), task("b", created_at=2.0, status=TaskStatus.RUNNING)]
    await store.insert_workflow(workflow(), tasks)

    await store.mark_dispatched([])
    await store.mark_dispatched(())

    assert await store.get_tasks("wf-1") == {t.task_id: t for t in tasks}
    assert keys(await store.undispatched()) == [("wf-1", "a")]


async def test_save_after_mark_dispatched_replaces_the_flag(store: StateStore) -> None:
    await store.insert_workflow(workflow(task_count=1), [task("a")])
    await store.mark_dispatched([("wf-1", "a")])
    assert (await store.get_tasks("wf-1", ["a"]))["a"].dispatched is True

    # The router queues the task again for a new attempt: save() writes the whole record, flag included.
    retry = task("a", attempts=1)
    await store.save(tasks=[retry])
    assert await store.get_tasks("wf-1") == {"a": retry}
    assert await store.undispatched() == [retry]

    await store.mark_dispatched([("wf-1", "a")])
    retry.dispatched = True
    assert await store.get_tasks("wf-1") == {"a": retry}
    assert await store.undispatched() == []


async def test_mark_dispatched_racing_a_save_never_moves_the_task_back(store: StateStore) -> None:
    queued = [task(f"t{n:02}", created_at=float(n)) for n in range(20)]
    await store.insert_workflow(workflow(task_count=len(queued)), queued)
    running = [
        task(t.task_id, created_at=t.created_at, status=TaskStatus.RUNNING, dispatched=True, agent="a-1")
        for t in queued
    ]

    # Whichever lands first, the task must end up as saved: a confirm either finds it queued (and the save
    # then replaces it) or finds it running (and leaves it alone).
    await asyncio.gather(
        *(store.mark_dispatched([t.key]) for t in queued),
        *(store.save(tasks=[t]) for t in running),
    )

    assert await store.get_tasks("wf-1") == {t.task_id: t for t in running}
    assert await store.undispatched() == []


async def test_mark_dispatched_survives_a_new_store(durable_backend: Backend) -> None:
    async with durable_backend.make() as first:
        await first.insert_workflow(workflow(task_count=2), [task("a", created_at=1.0), task("b")])
        await first.mark_dispatched([("wf-1", "a")])

    async with durable_backend.make() as second:
        assert (await second.get_tasks("wf-1"))["a"] == task("a", created_at=1.0, dispatched=True)
        assert keys(await second.undispatched()) == [("wf-1", "b")]


async def test_a_save_after_mark_dispatched_stays_unconfirmed_in_a_new_store(
    durable_backend: Backend,
) -> None:
    # A confirm recorded, then (before any other write) the task queued again for a new attempt whose
    # publish is not confirmed: however the backend writes the flag (SQLite writes it behind), the flip
    # of the old attempt must never land on the new one, or a crash would leave it published by no one.
    async with durable_backend.make() as first:
        await first.insert_workflow(workflow(task_count=1), [task("a")])
        await first.mark_dispatched([("wf-1", "a")])
        retry = task("a", attempts=1)
        await first.save(tasks=[retry])
        await first.ping()
        assert await first.undispatched() == [retry]

    async with durable_backend.make() as second:
        assert await second.undispatched() == [retry]


# -- leased --------------------------------------------------------------------------------------------


async def test_leased_is_running_with_a_lease_oldest_first(store: StateStore) -> None:
    running = TaskStatus.RUNNING
    tasks = [
        task("plain", created_at=1.0, status=running),
        task("late", created_at=5.0, status=running, lease_s=60.0, attempts=2, agent="w2"),
        task("early", created_at=2.0, status=running, lease_s=30.0, attempts=1, agent="w1"),
        task("done", created_at=3.0, status=TaskStatus.SUCCEEDED, lease_s=60.0),
        task("queued", created_at=4.0),
    ]
    await store.insert_workflow(workflow(task_count=len(tasks)), tasks)

    found = await store.leased()
    assert keys(found) == [("wf-1", "early"), ("wf-1", "late")]
    assert found[0] == tasks[2], "every field comes back"
    assert keys(await store.leased(limit=1)) == [("wf-1", "early")]
    assert await store.leased(limit=0) == []


async def test_leased_follows_saves(store: StateStore) -> None:
    await store.insert_workflow(
        workflow(task_count=2), [task("a", created_at=1.0), task("b", created_at=2.0)]
    )
    assert await store.leased() == []

    a = task("a", created_at=1.0, status=TaskStatus.RUNNING, lease_s=60.0, attempts=1)
    b = task("b", created_at=2.0, status=TaskStatus.RUNNING, lease_s=60.0, attempts=1)
    await store.save(tasks=[a, b])
    assert keys(await store.leased()) == [("wf-1", "a"), ("wf-1", "b")]

    # The lease lapsed and the task went back to the queue; the other one finished.
    await store.save(
        tasks=[
            task("a", created_at=1.0, attempts=1),
            task("b", created_at=2.0, status=TaskStatus.SUCCEEDED, lease_s=None),
        ]
    )
    assert await store.leased() == []
    assert keys(await store.undispatched()) == [("wf-1", "a")]


# -- escalated -----------------------------------------------------------------------------------------


async def test_escalated_lists_tasks_waiting_for_an_operator_oldest_first(store: StateStore) -> None:
    escalation = {"reason": "max_attempts", "attempt": 3, "agent": "w1", "at": 5.0}
    tasks = [
        task("late", created_at=5.0, status=TaskStatus.ESCALATED, attempts=3, escalation=escalation),
        task("early", created_at=2.0, status=TaskStatus.ESCALATED, attempts=1, escalation=escalation),
        task("running", created_at=1.0, status=TaskStatus.RUNNING),
        task("dead", created_at=3.0, status=TaskStatus.DEAD),
        task("queued", created_at=4.0),
    ]
    await store.insert_workflow(workflow(task_count=len(tasks)), tasks)

    found = await store.escalated()
    assert keys(found) == [("wf-1", "early"), ("wf-1", "late")]
    assert found[1] == tasks[0], "every field comes back"
    assert keys(await store.escalated(limit=1)) == [("wf-1", "early")]
    assert await store.escalated(limit=0) == []


async def test_escalated_follows_saves(store: StateStore) -> None:
    await store.insert_workflow(
        workflow(task_count=2), [task("a", created_at=1.0), task("b", created_at=2.0)]
    )
    assert await store.escalated() == []

    await store.save(tasks=[task("a", created_at=1.0, status=TaskStatus.ESCALATED, attempts=2)])
    assert keys(await store.escalated()) == [("wf-1", "a")]

    # Resumed (queued again), or aborted (dead): it leaves the list.
    await store.save(tasks=[task("a", created_at=1.0, attempts=0)])
    assert await store.escalated() == []
    await store.save(tasks=[task("b", created_at=2.0, status=TaskStatus.ESCALATED)])
    await store.save(tasks=[task("b", created_at=2.0, status=TaskStatus.DEAD)])
    assert await store.escalated() == []


# -- unnotified ----------------------------------------------------------------------------------------


async def test_unnotified_is_finished_and_not_notified_oldest_first(store: StateStore) -> None:
    for record in [
        workflow("running", created_at=1.0),
        workflow("notified", created_at=2.0, status=WorkflowStatus.SUCCEEDED, notified=True),
        workflow("cancelled", created_at=5.0, status=WorkflowStatus.CANCELLED),
        workflow("failed", created_at=4.0, status=WorkflowStatus.FAILED),
        workflow("succeeded", created_at=3.0, status=WorkflowStatus.SUCCEEDED),
    ]:
        await store.insert_workflow(record, [])

    assert ids(await store.unnotified()) == ["succeeded", "failed", "cancelled"]
    assert ids(await store.unnotified(limit=2)) == ["succeeded", "failed"]


async def test_unnotified_follows_saves(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1", created_at=1.0), [])
    await store.insert_workflow(workflow("wf-2", created_at=2.0), [])
    assert await store.unnotified() == []

    finished = workflow("wf-1", created_at=1.0, status=WorkflowStatus.FAILED, finished_at=9.0)
    await store.save(workflows=[finished])
    assert await store.unnotified() == [finished]

    finished.notified = True
    await store.save(workflows=[finished, workflow("wf-2", created_at=2.0, status=WorkflowStatus.SUCCEEDED)])
    assert ids(await store.unnotified()) == ["wf-2"]


# -- list_workflows ------------------------------------------------------------------------------------


async def test_list_workflows_newest_first_with_status_and_limit(store: StateStore) -> None:
    statuses = [
        WorkflowStatus.RUNNING,
        WorkflowStatus.SUCCEEDED,
        WorkflowStatus.RUNNING,
        WorkflowStatus.FAILED,
        WorkflowStatus.SUCCEEDED,
    ]
    # Inserted out of creation order, so that order of insertion cannot pass for order of creation.
    for n in [3, 0, 4, 1, 2]:
        await store.insert_workflow(workflow(f"wf-{n}", created_at=100.0 + n, status=statuses[n]), [])

    assert ids(await store.list_workflows()) == ["wf-4", "wf-3", "wf-2", "wf-1", "wf-0"]
    assert ids(await store.list_workflows(limit=2)) == ["wf-4", "wf-3"]
    assert ids(await store.list_workflows(status=WorkflowStatus.RUNNING)) == ["wf-2", "wf-0"]
    assert ids(await store.list_workflows(status=WorkflowStatus.SUCCEEDED, limit=1)) == ["wf-4"]
    assert await store.list_workflows(status=WorkflowStatus.CANCELLED) == []
    listed = await store.list_workflows(status=WorkflowStatus.FAILED)
    assert listed == [workflow("wf-3", created_at=103.0, status=WorkflowStatus.FAILED)]


async def test_list_workflows_follows_saves(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1", created_at=1.0), [])
    await store.insert_workflow(workflow("wf-2", created_at=2.0), [])

    await store.save(workflows=[workflow("wf-2", created_at=2.0, status=WorkflowStatus.CANCELLED)])
    assert ids(await store.list_workflows(status=WorkflowStatus.RUNNING)) == ["wf-1"]
    # A workflow that left a status no longer takes a place within the limit of that status.
    assert ids(await store.list_workflows(status=WorkflowStatus.RUNNING, limit=1)) == ["wf-1"]
    assert ids(await store.list_workflows(status=WorkflowStatus.CANCELLED)) == ["wf-2"]

    # save() replaces every field, the creation time the listing orders by included.
    await store.save(workflows=[workflow("wf-1", created_at=3.0)])
    assert ids(await store.list_workflows()) == ["wf-1", "wf-2"]


async def test_list_workflows_of_an_empty_store(store: StateStore) -> None:
    assert await store.list_workflows() == []
    assert await store.list_workflows(status=WorkflowStatus.RUNNING) == []


# -- agents, ping --------------------------------------------------------------------------------------


async def test_known_capabilities_are_those_of_workflows_and_agents_sorted(store: StateStore) -> None:
    assert await store.known_capabilities() == []
    await store.insert_workflow(
        workflow("wf-1", capabilities=["demo.sum", "llm.call"]),
        [task("a", capability="llm.call"), task("b", capability="demo.sum")],
    )
    await store.insert_workflow(
        workflow("wf-2", capabilities=["demo.sum"]), [task("a", "wf-2", capability="demo.sum")]
    )
    await store.put_agent(AgentRecord("a-1", "demo", "h", 1, ["demo.echo", "demo.sum"], 2))
    await store.put_agent(AgentRecord("b-2", "gpu", "h", 2, ["gpu.render"], 1))
    assert await store.known_capabilities() == ["demo.echo", "demo.sum", "gpu.render", "llm.call"]


async def test_put_agent_replaces_by_id_and_list_is_by_id(store: StateStore) -> None:
    assert await store.list_agents() == []
    b = AgentRecord("b-2", "demo", "host-b", 2, ["demo.sum"], 4, first_seen=1.0, last_seen=1.0)
    a = AgentRecord("a-1", "demo", "host-a", 1, ["demo.echo"], 2, first_seen=1.0, last_seen=1.0)
    await store.put_agent(b)
    await store.put_agent(a)
    assert await store.list_agents() == [a, b]

    newer_b = AgentRecord(
        "b-2", "demo", "host-b", 2, ["demo.sum"], 4, in_flight=3, health="degraded", last_seen=9.0
    )
    await store.put_agent(newer_b)
    assert await store.list_agents() == [a, newer_b]


async def test_ping_answers(store: StateStore) -> None:
    await store.ping()


# -- lifecycle -----------------------------------------------------------------------------------------

#: One call of every StateStore method.
CALLS: dict[str, Callable[[StateStore], Awaitable[object]]] = {
    "insert_workflow": lambda s: s.insert_workflow(workflow(), []),
    "get_workflow": lambda s: s.get_workflow("wf-1"),
    "get_tasks": lambda s: s.get_tasks("wf-1"),
    "get_tasks(ids)": lambda s: s.get_tasks("wf-1", ["a"]),
    "save": lambda s: s.save(workflows=[workflow()]),
    "mark_dispatched": lambda s: s.mark_dispatched([("wf-1", "a")]),
    "mark_dispatched(none)": lambda s: s.mark_dispatched([]),
    "undispatched": lambda s: s.undispatched(),
    "unnotified": lambda s: s.unnotified(),
    "list_workflows": lambda s: s.list_workflows(),
    "put_agent": lambda s: s.put_agent(AgentRecord("a", "demo", "h", 1, [], 1)),
    "list_agents": lambda s: s.list_agents(),
    "known_capabilities": lambda s: s.known_capabilities(),
    "ping": lambda s: s.ping(),
}


@pytest.mark.parametrize("method", list(CALLS))
async def test_methods_before_open_raise_not_connected(backend: Backend, method: str) -> None:
    store = backend.make()
    with pytest.raises(NotConnectedError):
        await CALLS[method](store)


@pytest.mark.parametrize("method", list(CALLS))
async def test_methods_after_close_raise_not_connected(backend: Backend, method: str) -> None:
    store = backend.make()
    async with store:
        await store.ping()
    with pytest.raises(NotConnectedError):
        await CALLS[method](store)


async def test_store_is_a_state_store(store: StateStore) -> None:
    assert isinstance(store, StateStore)


async def test_second_enter_while_open_is_refused(store: StateStore) -> None:
    with pytest.raises(NotConnectedError):
        await store.__aenter__()
    # The refusal leaves the open store working.
    await store.ping()


async def test_reopened_instance_keeps_its_data(backend: Backend) -> None:
    store = backend.make()
    async with store:
        await store.insert_workflow(workflow(task_count=1), [task("a")])
    async with store:
        assert await store.get_workflow("wf-1") == workflow(task_count=1)


async def test_committed_data_survives_a_new_store(durable_backend: Backend) -> None:
    backend = durable_backend
    wf = workflow(status=WorkflowStatus.SUCCEEDED, task_count=2, remaining=0)
    tasks = [task("a", status=TaskStatus.SUCCEEDED, result=NESTED), task("b")]
    async with backend.make() as first:
        await first.insert_workflow(wf, tasks)
        await first.put_agent(
            AgentRecord("a-1", "demo", "h", 1, ["demo.echo"], 1, first_seen=1.0, last_seen=2.0)
        )

    async with backend.make() as second:
        assert await second.get_workflow("wf-1") == wf
        assert await second.get_tasks("wf-1") == {t.task_id: t for t in tasks}
        assert keys(await second.undispatched()) == [("wf-1", "b")]
        assert ids(await second.unnotified()) == ["wf-1"]
        assert [a.agent_id for a in await second.list_agents()] == ["a-1"]
        # ...and the reopened store keeps writing to the same data.
        assert await second.insert_workflow(workflow(), []) == wf


# -- backend specifics ---------------------------------------------------------------------------------


async def test_sqlite_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = SqliteStore(blocker / "fabric.db")
    with pytest.raises(StoreError, match="cannot open SQLite store"):
        await store.__aenter__()
    # The failed open left nothing half-open behind.
    with pytest.raises(NotConnectedError):
        await store.ping()


async def test_sqlite_writes_dispatched_flags_behind_and_commits_them_alone(tmp_path: Path) -> None:
    path = tmp_path / "fabric.db"

    def committed() -> list[tuple[str, int]]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT task_id, dispatched FROM tasks ORDER BY task_id").fetchall()

    async with SqliteStore(path) as store:
        await store.insert_workflow(workflow(task_count=2), [task("a"), task("b")])
        await store.mark_dispatched([("wf-1", "a")])
        # Seen at once through the store, though not committed yet...
        assert keys(await store.undispatched()) == [("wf-1", "b")]
        assert (await store.get_tasks("wf-1"))["a"].dispatched is True
        # ...and committed on its own shortly after, with no other write to carry it.
        await eventually(lambda: committed() == [("a", 1), ("b", 0)], timeout=10, what="the flip committed")


async def test_redis_unreachable_raises_store_error_without_password() -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    store = RedisStore("redis://fabric:s3cret-pw@127.0.0.1:1/0", prefix=f"test-{uuid.uuid4().hex}:")
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as raised:
        await store.__aenter__()
    assert "s3cret-pw" not in str(raised.value)
    assert "***" in str(raised.value)
    with pytest.raises(NotConnectedError):
        await store.ping()


@pytest.mark.redis
async def test_redis_prefixes_isolate_stores_and_purge_only_its_own(redis_url: str) -> None:
    one = RedisStore(redis_url, prefix=f"test-{uuid.uuid4().hex}:")
    other = RedisStore(redis_url, prefix=f"test-{uuid.uuid4().hex}:")
    try:
        await one.__aenter__()
        await other.__aenter__()
    except StoreError as exc:
        await one.__aexit__(None, None, None)
        unreachable(f"Redis is unreachable: {exc}")
    try:
        await one.insert_workflow(workflow(status=WorkflowStatus.FAILED), [task("a")])
        await one.put_agent(AgentRecord("a-1", "demo", "h", 1, [], 1))
        await other.insert_workflow(workflow("wf-other"), [task("a", "wf-other")])

        assert ids(await one.list_workflows()) == ["wf-1"]
        assert ids(await other.list_workflows()) == ["wf-other"]
        assert await other.get_workflow("wf-1") is None
        assert keys(await other.undispatched()) == [("wf-other", "a")]
        assert await other.unnotified() == []
        assert await other.list_agents() == []

        await one.purge()
        assert await one.list_workflows() == []
        assert await one.get_tasks("wf-1") == {}
        assert await one.list_agents() == []
        assert ids(await other.list_workflows()) == ["wf-other"]
    finally:
        for store in (one, other):
            await store.purge()
            await store.__aexit__(None, None, None)


async def test_redis_store_refuses_an_empty_prefix() -> None:
    from fabric.errors import ConfigError

    with pytest.raises(ConfigError):
        RedisStore("redis://127.0.0.1:6379/0", prefix="")


@contextlib.asynccontextmanager
async def _redis_pair(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two open stores over one fresh prefix (two clients of the same data), purged afterwards."""
    prefix = f"test-{uuid.uuid4().hex}:"
    one, other = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    try:
        await one.__aenter__()
    except StoreError as exc:
        unreachable(f"Redis is unreachable: {exc}")
    try:
        await other.__aenter__()
        try:
            yield one, other
        finally:
            await other.__aexit__(None, None, None)
    finally:
        await one.purge()
        await one.__aexit__(None, None, None)


@pytest.mark.redis
async def test_redis_mark_dispatched_rereads_a_task_written_between_read_and_exec(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _redis_pair(redis_url) as (store, other_router):
        await store.insert_workflow(workflow(task_count=2), [task("a"), task("b", created_at=2.0)])
        running = task("a", status=TaskStatus.RUNNING, dispatched=True, agent="a-1")
        hmget = Pipeline.hmget
        reads = 0

        def hmget_then_race(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
            async def race() -> Any:
                nonlocal reads
                reads += 1
                found = await hmget(pipe, *args, **kwargs)
                if reads == 1:
                    # Another client moves "a" on after our read, before our EXEC.
                    await other_router.save(tasks=[running])
                return found

            return race()

        monkeypatch.setattr(Pipeline, "hmget", hmget_then_race)
        await store.mark_dispatched([("wf-1", "a"), ("wf-1", "b")])

        assert reads == 2  # the EXEC was refused and the documents read again
        assert await store.get_tasks("wf-1") == {
            "a": running,
            "b": task("b", created_at=2.0, dispatched=True),
        }
        assert await store.undispatched() == []


@pytest.mark.redis
async def test_redis_mark_dispatched_gives_up_loudly_when_always_contended(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _redis_pair(redis_url) as (store, other_router):
        await store.insert_workflow(workflow(task_count=2), [task("a"), task("b")])
        hmget = Pipeline.hmget

        def hmget_then_race(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
            async def race() -> Any:
                found = await hmget(pipe, *args, **kwargs)
                await other_router.save(tasks=[task("b", attempts=1)])
                return found

            return race()

        monkeypatch.setattr(Pipeline, "hmget", hmget_then_race)
        with pytest.raises(StoreError, match="kept changing"):
            await store.mark_dispatched([("wf-1", "a")])
        monkeypatch.undo()

        # Nothing of the call was written.
        assert (await store.get_tasks("wf-1"))["a"] == task("a")
        assert keys(await store.undispatched()) == [("wf-1", "a"), ("wf-1", "b")]


class _Partition:
    """A TCP proxy to Redis that can go silent both ways, like a partition that sends no RST.

    Connections are accepted (by the kernel) even while cut, so a client connects, sends, and waits.
    """

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self.cut = False
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _Partition:
        """Start listening; :attr:`url` is then the Redis URL that goes through the proxy."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}{self._db}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for pump in list(self._tasks):
            pump.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.append(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            # Nothing behind the proxy: a black hole that takes everything and never answers.
            pumps = [self._pump(client_reader, None)]
        else:
            self._writers.append(upstream_writer)
            pumps = [self._pump(client_reader, upstream_writer), self._pump(upstream_reader, client_writer)]
        for coro in pumps:
            pump = asyncio.create_task(coro)
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        """Forward ``reader`` to ``writer`` while not cut; drop everything while cut or without a writer."""
        try:
            while data := await reader.read(65536):
                if writer is not None and not self.cut:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            if writer is not None:
                writer.close()


async def test_redis_that_accepts_but_never_answers_fails_open_within_the_timeout() -> None:
    async with _Partition("redis://127.0.0.1:1/0") as partition:  # nothing behind it: never answers
        store = RedisStore(
            partition.url, prefix=f"test-{uuid.uuid4().hex}:", socket_timeout=0.3, connect_timeout=0.3
        )
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot reach Redis"):
            await asyncio.wait_for(store.__aenter__(), timeout=10)
        assert time.monotonic() - started < 5
        with pytest.raises(NotConnectedError):
            await store.ping()


@pytest.mark.redis
async def test_redis_silent_partition_fails_store_calls_within_the_timeout(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    async with _Partition(redis_url) as partition:
        store = RedisStore(partition.url, prefix=prefix, socket_timeout=0.3, connect_timeout=0.3)
        try:
            await store.__aenter__()
        except StoreError as exc:
            unreachable(f"Redis is unreachable: {exc}")
        try:
            await store.insert_workflow(workflow(task_count=1), [task("a")])
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "get_workflow": lambda: store.get_workflow("wf-1"),
                "save": lambda: store.save(tasks=[task("a", status=TaskStatus.RUNNING)]),
                "insert_workflow": lambda: store.insert_workflow(workflow("wf-2"), []),
                "mark_dispatched": lambda: store.mark_dispatched([("wf-1", "a")]),
            }
            for name, call in calls.items():
                partition.cut = True
                started = time.monotonic()
                with pytest.raises(StoreError, match="failed"):
                    await asyncio.wait_for(call(), timeout=10)
                assert time.monotonic() - started < 5, name

            # Once the network is back, the same store works again.
            partition.cut = False
            assert (await store.get_tasks("wf-1"))["a"] == task("a")
        finally:
            partition.cut = False
            await store.purge()
            await store.__aexit__(None, None, None)


def test_redis_store_refuses_non_positive_timeouts() -> None:
    from fabric.errors import ConfigError

    with pytest.raises(ConfigError):
        RedisStore("redis://127.0.0.1:6379/0", socket_timeout=0)
    with pytest.raises(ConfigError):
        RedisStore("redis://127.0.0.1:6379/0", connect_timeout=-1)
