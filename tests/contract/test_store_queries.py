"""The StateStore query contract (query_workflows, query_dead), checked against every backend.

Keyset pages, newest first, in a stable order; filters by status, capability and time range.
Times are explicit values, never the clock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fabric.protocol import codec
from fabric.protocol.messages import TaskStatus, WorkflowStatus
from fabric.store import DeadQuery, Page, StateStore, TaskRecord, WorkflowQuery
from fabric.store.sqlite import SqliteStore

from .test_store import ids, task, workflow


async def all_pages(fetch: Any, limit: int) -> list[Any]:
    """Follow next_cursor from the first page to the last; every item in the order served."""
    items: list[Any] = []
    cursor = None
    for _ in range(1000):
        page = await fetch(limit=limit, cursor=cursor)
        assert isinstance(page, Page)
        assert len(page.items) <= limit
        items += page.items
        cursor = page.next_cursor
        if cursor is None:
            return items
    raise AssertionError("pages never ended")


async def seed(store: StateStore) -> None:
    """Six workflows; two share a creation time (the id breaks the tie)."""
    specs = [
        ("wf-a", 100.0, WorkflowStatus.SUCCEEDED, ["demo.echo"]),
        ("wf-b", 101.0, WorkflowStatus.RUNNING, ["demo.echo", "demo.sum"]),
        ("wf-c", 102.0, WorkflowStatus.FAILED, ["demo.sum"]),
        ("wf-d", 102.0, WorkflowStatus.RUNNING, ["demo.sleep"]),
        ("wf-e", 103.0, WorkflowStatus.RUNNING, ["demo.sum"]),
        ("wf-f", 104.0, WorkflowStatus.CANCELLED, ["demo.echo"]),
    ]
    for wid, at, status, caps in [specs[i] for i in (3, 0, 5, 1, 4, 2)]:  # not in creation order
        await store.insert_workflow(workflow(wid, created_at=at, status=status, capabilities=caps), [])


async def test_query_workflows_pages_newest_first_each_once(store: StateStore) -> None:
    await seed(store)
    expected = ["wf-f", "wf-e", "wf-d", "wf-c", "wf-b", "wf-a"]
    first = await store.query_workflows()
    assert ids(first.items) == expected
    assert first.next_cursor is None
    for limit in (1, 2, 4, 5, 6):
        assert ids(await all_pages(store.query_workflows, limit)) == expected, limit
    page = await store.query_workflows(limit=2)
    assert ids(page.items) == ["wf-f", "wf-e"]
    assert page.next_cursor is not None
    assert ids((await store.query_workflows(limit=2, cursor=page.next_cursor)).items) == ["wf-d", "wf-c"]
    stored = await store.get_workflow("wf-b")
    assert stored is not None
    assert stored.capabilities == ["demo.echo", "demo.sum"]


async def test_query_workflows_filters(store: StateStore) -> None:
    await seed(store)

    async def query(limit: int = 50, **where: Any) -> list[str]:
        q = WorkflowQuery(**where)
        return ids(await all_pages(lambda **kw: store.query_workflows(q, **kw), limit))

    assert await query(status=WorkflowStatus.RUNNING) == ["wf-e", "wf-d", "wf-b"]
    assert await query(1, status=WorkflowStatus.RUNNING) == ["wf-e", "wf-d", "wf-b"]
    assert await query(capability="demo.sum") == ["wf-e", "wf-c", "wf-b"]
    assert await query(1, capability="demo.echo") == ["wf-f", "wf-b", "wf-a"]
    assert await query(status=WorkflowStatus.RUNNING, capability="demo.sum") == ["wf-e", "wf-b"]
    assert await query(1, status=WorkflowStatus.RUNNING, capability="demo.sum") == ["wf-e", "wf-b"]
    assert await query(since=101.0, until=103.0) == ["wf-d", "wf-c", "wf-b"]
    assert await query(1, since=102.0) == ["wf-f", "wf-e", "wf-d", "wf-c"]
    assert await query(until=102.0, capability="demo.echo") == ["wf-b", "wf-a"]
    assert await query(capability="nobody.has") == []
    assert await query(status=WorkflowStatus.FAILED, since=200.0) == []


async def test_query_workflows_follows_saves_and_new_workflows_do_not_shift_pages(
    store: StateStore,
) -> None:
    await seed(store)
    page = await store.query_workflows(WorkflowQuery(status=WorkflowStatus.RUNNING), limit=1)
    assert ids(page.items) == ["wf-e"]
    # A newer workflow arrives and an older one finishes between two pages.
    await store.insert_workflow(workflow("wf-z", created_at=500.0, capabilities=["demo.sum"]), [])
    await store.save(
        workflows=[workflow("wf-b", created_at=101.0, status=WorkflowStatus.SUCCEEDED, capabilities=[])]
    )
    rest = await all_pages(
        lambda **kw: store.query_workflows(
            WorkflowQuery(status=WorkflowStatus.RUNNING), cursor=kw["cursor"] or page.next_cursor, limit=1
        ),
        1,
    )
    assert ids(rest) == ["wf-d"]
    assert ids((await store.query_workflows(WorkflowQuery(capability="demo.sum"))).items)[0] == "wf-z"


async def test_query_workflows_many_with_status_and_capability(store: StateStore) -> None:
    """Entries filtered beyond the index still come out complete and in order, page after page."""
    expected = []
    for n in range(120):
        status = WorkflowStatus.RUNNING if n % 7 == 0 else WorkflowStatus.SUCCEEDED
        caps = ["demo.sum"] if n % 2 == 0 else ["demo.echo"]
        await store.insert_workflow(
            workflow(f"wf-{n:03d}", created_at=float(n), status=status, capabilities=caps), []
        )
        if n % 14 == 0:
            expected.append(f"wf-{n:03d}")
    q = WorkflowQuery(status=WorkflowStatus.RUNNING, capability="demo.sum")
    found = await all_pages(lambda **kw: store.query_workflows(q, **kw), 3)
    assert ids(found) == list(reversed(expected))


async def test_query_rejects_bad_cursor_and_limit(store: StateStore) -> None:
    await seed(store)
    for bad in ("nonsense!", "W10", "WyJ4Il0"):  # not base64 / [] / ["x"]
        with pytest.raises(ValueError, match="cursor"):
            await store.query_workflows(cursor=bad)
        with pytest.raises(ValueError, match="cursor"):
            await store.query_dead(cursor=bad)
    # A workflow cursor is not a dead-task cursor.
    page = await store.query_workflows(limit=1)
    assert page.next_cursor is not None
    with pytest.raises(ValueError, match="cursor"):
        await store.query_dead(cursor=page.next_cursor)
    for limit in (0, -1, 1001):
        with pytest.raises(ValueError, match="limit"):
            await store.query_workflows(limit=limit)
        with pytest.raises(ValueError, match="limit"):
            await store.query_dead(limit=limit)


def dead(task_id: str, workflow_id: str, at: float, capability: str = "demo.echo") -> TaskRecord:
    return task(
        task_id,
        workflow_id,
        status=TaskStatus.DEAD,
        capability=capability,
        finished_at=at,
        attempts=3,
        error={"type": "ValueError", "message": "boom"},
    )


async def test_query_dead_lists_parked_tasks_newest_first(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1"), [task("a", "wf-1"), task("b", "wf-1")])
    await store.insert_workflow(workflow("wf-2"), [task("a", "wf-2"), task("c", "wf-2")])
    assert (await store.query_dead()).items == []
    await store.save(
        tasks=[
            dead("a", "wf-1", 10.0),
            dead("b", "wf-1", 12.0, "demo.sum"),
            dead("a", "wf-2", 12.0),  # ties with wf-1/b: ids break the tie
            task("c", "wf-2", status=TaskStatus.FAILED, finished_at=13.0),  # failed, not parked
        ]
    )
    listed = await store.query_dead()
    assert [t.key for t in listed.items] == [("wf-2", "a"), ("wf-1", "b"), ("wf-1", "a")]
    assert listed.items[0].error == {"type": "ValueError", "message": "boom"}
    assert listed.next_cursor is None
    for limit in (1, 2, 3):
        assert [t.key for t in await all_pages(store.query_dead, limit)] == [
            ("wf-2", "a"),
            ("wf-1", "b"),
            ("wf-1", "a"),
        ]
    by_cap = await store.query_dead(DeadQuery(capability="demo.echo"))
    assert [t.key for t in by_cap.items] == [("wf-2", "a"), ("wf-1", "a")]
    in_range = await store.query_dead(DeadQuery(since=11.0, until=12.5))
    assert [t.key for t in in_range.items] == [("wf-2", "a"), ("wf-1", "b")]
    assert (await store.query_dead(DeadQuery(capability="demo.sum", until=12.0))).items == []

    # A replayed task is queued again: it leaves the list.
    await store.save(tasks=[task("b", "wf-1", capability="demo.sum", status=TaskStatus.QUEUED)])
    assert [t.key for t in (await store.query_dead()).items] == [("wf-2", "a"), ("wf-1", "a")]
    assert (await store.query_dead(DeadQuery(capability="demo.sum"))).items == []


async def test_sqlite_file_of_schema_1_is_migrated(tmp_path: Path) -> None:
    """A file written before the query indexes: dead tasks are found, new workflows by capability,
    recalled tasks listed (schema 3; this test expected version "2" before the recall column)."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE workflows (workflow_id TEXT PRIMARY KEY, status TEXT NOT NULL,
            notified INTEGER NOT NULL, created_at REAL NOT NULL, doc BLOB NOT NULL);
        CREATE TABLE tasks (workflow_id TEXT NOT NULL, task_id TEXT NOT NULL, status TEXT NOT NULL,
            dispatched INTEGER NOT NULL, created_at REAL NOT NULL, doc BLOB NOT NULL,
            PRIMARY KEY (workflow_id, task_id)) WITHOUT ROWID;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        """
    )
    old = workflow("wf-old", created_at=5.0)
    old_doc = {k: v for k, v in old.to_dict().items() if k != "capabilities"}
    parked = dead("t", "wf-old", 7.0)
    db.execute("INSERT INTO workflows VALUES (?, 'running', 0, 5.0, ?)", ("wf-old", codec.encode(old_doc)))
    db.execute(
        "INSERT INTO tasks VALUES ('wf-old', 't', 'dead', 1, 1000.0, ?)", (codec.encode(parked.to_dict()),)
    )
    db.commit()
    db.close()

    async with SqliteStore(path) as store:
        assert [t.key for t in (await store.query_dead()).items] == [("wf-old", "t")]
        assert ids((await store.query_workflows()).items) == ["wf-old"]
        await store.insert_workflow(workflow("wf-new", created_at=6.0, capabilities=["demo.echo"]), [])
        assert ids((await store.query_workflows(WorkflowQuery(capability="demo.echo"))).items) == ["wf-new"]
        # Schema 3: the recall column, added with 0 for every old task, and its index.
        assert (await store.recalled()).items == []
        cancelled = task("c", "wf-new", status=TaskStatus.CANCELLED, recall=True)
        await store.save(tasks=[cancelled])
        assert (await store.recalled()).items == [("wf-new", "c")]
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    db.close()


async def test_sqlite_queries_use_indexes(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "plan.db") as store:
        await store.insert_workflow(workflow("wf-1"), [])
    db = sqlite3.connect(tmp_path / "plan.db")
    plans = {
        "status": "SELECT doc FROM workflows WHERE status = 'running' AND created_at >= 1 "
        "AND (created_at, workflow_id) < (9, 'x') ORDER BY created_at DESC, workflow_id DESC LIMIT 5",
        "all": "SELECT doc FROM workflows ORDER BY created_at DESC, workflow_id DESC LIMIT 5",
        "dead": "SELECT doc FROM tasks WHERE status = 'dead' ORDER BY ended_at DESC, workflow_id DESC, "
        "task_id DESC LIMIT 5",
        "capability": "SELECT w.doc FROM workflow_capabilities c JOIN workflows w "
        "ON w.workflow_id = c.workflow_id WHERE c.capability = 'x' "
        "ORDER BY c.created_at DESC, c.workflow_id DESC LIMIT 5",
    }
    for name, sql in plans.items():
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "TEMP B-TREE" not in plan, (name, plan)  # the index gives the order: no sort
    dead_plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {plans['dead']}"))
    assert "tasks_dead" in dead_plan
    db.close()
