"""Concurrent calls on one store: bursts of writes, a bad write among good ones, order of issue.

The SQLite store commits concurrent writes in groups (one transaction, each call in its own savepoint);
these tests pin down what its callers may rely on, and check the other backends keep the same promises
where the interface makes them. Helpers come from ``test_store.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, cast

import pytest

from fabric.errors import ProtocolError, StoreError
from fabric.protocol.messages import TaskStatus
from fabric.store import AgentRecord, StateStore
from fabric.store import sqlite as sqlite_module
from fabric.store.sqlite import SqliteStore

from .conftest import Backend, _backend
from .test_store import keys, task, workflow

# -- every backend -------------------------------------------------------------------------------------


async def test_many_concurrent_saves_all_commit_and_survive_a_new_store(durable_backend: Backend) -> None:
    # RedisStore fails a call outright when all of its pool's 100 connections are busy.
    count = 90 if durable_backend.name == "redis" else 1000
    async with durable_backend.make() as first:
        await asyncio.gather(
            *(
                first.save(
                    workflows=[workflow(f"wf-{n:04}", created_at=float(n), task_count=1)],
                    tasks=[task("a", f"wf-{n:04}", created_at=float(n), input={"n": n})],
                )
                for n in range(count)
            ),
            *(first.put_agent(AgentRecord(f"a-{n}", "demo", "h", n, [], 1)) for n in range(5)),
        )
        await asyncio.gather(*(first.mark_dispatched([(f"wf-{n:04}", "a")]) for n in range(0, count, 2)))
        assert len(await first.list_workflows(limit=count + 1)) == count

    # Every caller returned only after its write committed: all of it is in a new store over the same data.
    async with durable_backend.make() as second:
        assert len(await second.list_workflows(limit=count + 1)) == count
        for n in (0, 1, count // 2, count - 1):
            assert (await second.get_tasks(f"wf-{n:04}"))["a"].input == {"n": n}
        assert keys(await second.undispatched(limit=count)) == [
            (f"wf-{n:04}", "a") for n in range(1, count, 2)
        ]
        assert len(await second.list_agents()) == 5


async def test_one_unencodable_write_in_a_concurrent_burst_fails_alone(store: StateStore) -> None:
    await store.insert_workflow(workflow(task_count=1), [task("a")])
    calls = [store.save(tasks=[task(f"t{n:02}", created_at=float(n))]) for n in range(20)]
    calls.insert(10, store.save(tasks=[task("bad-1"), task("bad-2", result=object())]))

    results = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(results[10], ProtocolError)
    assert [r for n, r in enumerate(results) if n != 10] == [None] * 20
    stored = await store.get_tasks("wf-1")
    assert set(stored) == {"a", *(f"t{n:02}" for n in range(20))}


async def test_concurrent_inserts_return_each_caller_its_own_result(store: StateStore) -> None:
    existing = [workflow(f"wf-{n}", fingerprint=f"old-{n}", task_count=1) for n in range(5)]
    for wf in existing:
        await store.insert_workflow(wf, [task("a", wf.workflow_id)])

    results = await asyncio.gather(
        *(
            store.insert_workflow(
                workflow(f"wf-{n}", fingerprint=f"new-{n}", task_count=1), [task("b", f"wf-{n}")]
            )
            for n in range(10)
        )
    )

    # Each caller whose id was taken got the record stored under *its* id; the others stored theirs.
    assert results == [*existing, *([None] * 5)]
    for n in range(10):
        tasks = await store.get_tasks(f"wf-{n}")
        assert list(tasks) == (["a"] if n < 5 else ["b"])


# -- backends that apply concurrent calls in the order they were issued (not Redis: its calls run on
# -- pooled connections and may overtake each other, so there a caller awaits a write before the next)


@pytest.fixture(params=["memory", "sqlite"])
async def ordered_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    async with _backend(request.param, tmp_path, "unused:") as selected, selected.make() as opened:
        yield opened


async def test_concurrent_saves_of_one_task_apply_in_issue_order(ordered_store: StateStore) -> None:
    store = ordered_store
    await store.insert_workflow(workflow(task_count=1), [task("a")])

    await asyncio.gather(*(store.save(tasks=[task("a", attempts=n)]) for n in range(50)))

    assert (await store.get_tasks("wf-1"))["a"].attempts == 49


async def test_a_write_sees_every_write_issued_before_it(ordered_store: StateStore) -> None:
    store = ordered_store
    first = task("a", attempts=1)
    again = task("a", attempts=2)
    running = task("b", "wf-2", status=TaskStatus.RUNNING, dispatched=True, agent="a-1")

    await asyncio.gather(
        store.insert_workflow(workflow(task_count=1), [task("a")]),
        store.save(tasks=[first]),
        # Issued after `first` and before `again`: finds a queued, unconfirmed task and flips it...
        store.mark_dispatched([first.key]),
        # ...and `again` then replaces the whole record, the flag included.
        store.save(tasks=[again]),
        # A workflow inserted and moved on in one burst: the save finds the insert done.
        store.insert_workflow(workflow("wf-2", task_count=1), [task("b", "wf-2")]),
        store.save(tasks=[running]),
        store.mark_dispatched([("wf-2", "b")]),
    )

    assert await store.get_tasks("wf-1") == {"a": again}
    assert await store.get_tasks("wf-2") == {"b": running}
    assert keys(await store.undispatched()) == [("wf-1", "a")]


# -- SQLite: group commit ------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "fabric.db") as opened:
        yield opened


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[list[bool]]:
    """Per transaction the SQLite store committed, whether each of its write calls succeeded."""
    seen: list[list[bool]] = []
    commit = sqlite_module._commit

    def spy(db: Any, calls: Any) -> Any:
        outcomes = commit(db, calls)
        seen.append([ok for ok, _ in outcomes])
        return outcomes

    monkeypatch.setattr(sqlite_module, "_commit", spy)
    return seen


def _mixed_in_one_batch(batches: list[list[bool]]) -> bool:
    """True when some transaction held a failed call with successful calls both before and after it."""
    return any(
        not ok and any(batch[:n]) and any(batch[n + 1 :]) for batch in batches for n, ok in enumerate(batch)
    )


async def test_sqlite_concurrent_writes_share_bounded_transactions(
    sqlite_store: SqliteStore, batches: list[list[bool]]
) -> None:
    count = 2500
    await asyncio.gather(*(sqlite_store.save(tasks=[task(f"t{n:04}")]) for n in range(count)))

    assert sum(len(b) for b in batches) == count
    assert len(batches) < count / 100
    assert max(len(b) for b in batches) == sqlite_module._MAX_BATCH_OPS
    assert len(await sqlite_store.get_tasks("wf-1")) == count

    # A lone write does not wait for company: it commits in a transaction of its own.
    batches.clear()
    await sqlite_store.save(tasks=[task("alone")])
    assert batches == [[True]]


async def test_sqlite_a_write_failing_in_a_shared_transaction_fails_alone(
    tmp_path: Path, batches: list[list[bool]]
) -> None:
    path = tmp_path / "fabric.db"
    async with SqliteStore(path) as store:
        await store.insert_workflow(workflow(task_count=1), [task("a")])
        no_creation_time = task("half-2")
        no_creation_time.created_at = cast(Any, None)
        bad: dict[int, Awaitable[Any]] = {
            # Two tasks with one id: the primary key refuses the second after the workflow row went in,
            # so the savepoint must take the workflow row back out too.
            5: store.insert_workflow(workflow("wf-dup", task_count=2), [task("x", "wf-dup")] * 2),
            # NOT NULL refuses the second task of the call; the first must not stay behind.
            12: store.save(tasks=[task("half-1"), no_creation_time]),
        }
        calls = [bad.get(n) or store.save(tasks=[task(f"t{n:02}", created_at=float(n))]) for n in range(20)]

        results = await asyncio.gather(*calls, return_exceptions=True)

        assert isinstance(results[5], StoreError)
        assert "UNIQUE" in str(results[5])
        assert isinstance(results[12], StoreError)
        assert "NOT NULL" in str(results[12])
        assert [r for n, r in enumerate(results) if n not in bad] == [None] * 18
        assert _mixed_in_one_batch(batches)

    async with SqliteStore(path) as reopened:
        assert set(await reopened.get_tasks("wf-1")) == {
            "a",
            *(f"t{n:02}" for n in range(20) if n not in bad),
        }
        assert await reopened.get_workflow("wf-dup") is None
        assert await reopened.get_tasks("wf-dup") == {}


async def test_sqlite_a_write_that_ends_the_transaction_fails_alone(
    tmp_path: Path, batches: list[list[bool]]
) -> None:
    # SQLITE_FULL rolls back the whole transaction, not just the statement: the calls committed before
    # the failing one in the same transaction were lost with it, and must be written again, not reported
    # as committed.
    path = tmp_path / "fabric.db"
    async with SqliteStore(path) as store:
        await store.insert_workflow(workflow(task_count=1), [task("a")])

        def cap(db: Any) -> None:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={pages + 40}")

        await store._require().run(cap)
        huge = task("huge", input=b"x" * 1_000_000)
        calls = [store.save(tasks=[task(f"t{n:02}", created_at=float(n))]) for n in range(20)]
        calls.insert(10, store.save(tasks=[huge]))

        results = await asyncio.gather(*calls, return_exceptions=True)

        assert isinstance(results[10], StoreError)
        assert "full" in str(results[10])
        assert [r for n, r in enumerate(results) if n != 10] == [None] * 20
        assert _mixed_in_one_batch(batches)
        # The store goes on working after the failed transaction.
        await store.save(tasks=[task("after")])

    async with SqliteStore(path) as reopened:
        assert set(await reopened.get_tasks("wf-1")) == {"a", "after", *(f"t{n:02}" for n in range(20))}


async def test_sqlite_close_commits_the_writes_already_queued(tmp_path: Path) -> None:
    path = tmp_path / "fabric.db"
    store = SqliteStore(path)
    await store.__aenter__()
    await store.insert_workflow(workflow(task_count=1), [task("a")])
    writes = [asyncio.create_task(store.save(tasks=[task(f"t{n:03}")])) for n in range(300)]
    await asyncio.sleep(0)  # every write is queued (one is committing)

    await store.__aexit__(None, None, None)

    assert all(w.done() for w in writes)
    await asyncio.gather(*writes)
    async with SqliteStore(path) as reopened:
        assert len(await reopened.get_tasks("wf-1")) == 301


async def test_sqlite_a_write_cancelled_while_queued_writes_nothing(sqlite_store: SqliteStore) -> None:
    await sqlite_store.insert_workflow(workflow(task_count=1), [task("a")])
    committing = asyncio.create_task(sqlite_store.save(tasks=[task("first")]))
    queued = asyncio.create_task(sqlite_store.save(tasks=[task("cancelled")]))
    await asyncio.sleep(0)  # "first" is on the SQLite thread, "cancelled" waits for the next batch

    queued.cancel()
    await committing
    with pytest.raises(asyncio.CancelledError):
        await queued

    assert set(await sqlite_store.get_tasks("wf-1")) == {"a", "first"}
    # The store is not stuck on the cancelled write.
    await sqlite_store.save(tasks=[task("next")])
    assert set(await sqlite_store.get_tasks("wf-1")) == {"a", "first", "next"}


async def test_sqlite_reads_never_see_part_of_a_group_commit(sqlite_store: SqliteStore) -> None:
    # Each save moves two tasks together; a read between writes sees both moved or neither.
    await sqlite_store.insert_workflow(workflow(task_count=2), [task("a"), task("b")])
    seen: list[tuple[int, int]] = []

    async def read_repeatedly() -> None:
        for _ in range(200):
            tasks = await sqlite_store.get_tasks("wf-1", ["a", "b"])
            seen.append((tasks["a"].attempts, tasks["b"].attempts))
            await asyncio.sleep(0)

    await asyncio.gather(
        read_repeatedly(),
        *(sqlite_store.save(tasks=[task("a", attempts=n), task("b", attempts=n)]) for n in range(1, 400)),
    )

    assert all(a == b for a, b in seen)
    assert (await sqlite_store.get_tasks("wf-1"))["a"].attempts == 399


async def test_sqlite_in_memory_database_works(tmp_path: Path) -> None:
    async with SqliteStore(":memory:") as store:
        await asyncio.gather(*(store.save(tasks=[task(f"t{n}")]) for n in range(50)))
        assert len(await store.get_tasks("wf-1")) == 50
        await store.ping()


async def test_sqlite_keeps_the_synchronous_setting(tmp_path: Path) -> None:
    def synchronous(db: Any) -> int:
        return int(db.execute("PRAGMA synchronous").fetchone()[0])

    def journal_mode(db: Any) -> str:
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])

    for setting, level in [("FULL", 2), ("NORMAL", 1), ("EXTRA", 3)]:
        async with SqliteStore(tmp_path / "fabric.db", synchronous=setting) as store:
            assert await store._require().run(synchronous) == level
            assert await store._require().run(journal_mode) == "wal"
    async with SqliteStore(tmp_path / "fabric.db") as store:
        assert await store._require().run(synchronous) == 2
