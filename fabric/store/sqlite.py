"""Embedded durable state store on SQLite (the default).

WAL journal, ``synchronous=FULL`` by default so every committed batch survives a crash or power loss.
Records are stored as msgpack documents, with the columns the router queries by kept beside them.
The ``dispatched`` column of a task is authoritative: :meth:`SqliteStore.mark_dispatched` flips only the
column (never rewriting the document), and every read of a task takes ``dispatched`` from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite

from fabric.errors import NotConnectedError, ProtocolError, StoreError
from fabric.protocol import codec
from fabric.protocol.messages import WorkflowStatus
from fabric.store.base import AgentRecord, TaskRecord, WorkflowRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    workflow_id TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    notified    INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    doc         BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS workflows_created ON workflows (created_at);
CREATE INDEX IF NOT EXISTS workflows_unnotified ON workflows (workflow_id)
    WHERE status != 'running' AND notified = 0;
CREATE TABLE IF NOT EXISTS tasks (
    workflow_id TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    dispatched  INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    doc         BLOB NOT NULL,
    PRIMARY KEY (workflow_id, task_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_undispatched ON tasks (created_at)
    WHERE status = 'queued' AND dispatched = 0;
CREATE TABLE IF NOT EXISTS agents (
    agent_id  TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    doc       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_SCHEMA_VERSION = "1"

_INSERT_TASK = (
    "INSERT INTO tasks (workflow_id, task_id, status, dispatched, created_at, doc) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_WORKFLOW = (
    "INSERT INTO workflows (workflow_id, status, notified, created_at, doc) VALUES (?, ?, ?, ?, ?)"
)
# save() replaces the whole record, so every column kept beside the document is updated with it
# (created_at included: the indexes must order by the same value the document holds).
_UPSERT_TASK = (
    f"{_INSERT_TASK} ON CONFLICT (workflow_id, task_id) DO UPDATE SET status = excluded.status, "
    "dispatched = excluded.dispatched, created_at = excluded.created_at, doc = excluded.doc"
)
_UPSERT_WORKFLOW = (
    f"{_INSERT_WORKFLOW} ON CONFLICT (workflow_id) DO UPDATE SET status = excluded.status, "
    "notified = excluded.notified, created_at = excluded.created_at, doc = excluded.doc"
)


#: The publish confirm: flips the authoritative column only, and only while the task is queued and not
#: dispatched, so it never overwrites (or moves backwards) a task that changed meanwhile.
_MARK_DISPATCHED = (
    "UPDATE tasks SET dispatched = 1 "
    "WHERE workflow_id = ? AND task_id = ? AND status = 'queued' AND dispatched = 0"
)
#: Columns every task read selects: see :func:`_task_from_row`.
_TASK_COLUMNS = "doc, dispatched"


def _task_row(t: TaskRecord) -> tuple[Any, ...]:
    doc = codec.encode(t.to_dict())
    return (t.workflow_id, t.task_id, str(t.status), int(t.dispatched), t.created_at, doc)


def _workflow_row(w: WorkflowRecord) -> tuple[Any, ...]:
    return (w.workflow_id, str(w.status), int(w.notified), w.created_at, codec.encode(w.to_dict()))


class SqliteStore:
    """State in one SQLite file.

    Example:
        >>> async with SqliteStore("fabric.db") as store:
        ...     await store.list_workflows()
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self._path = str(path)
        self._synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine: without this lock a second coroutine's BEGIN fails inside
        # the first one's transaction, and its reads see (or lose to a ROLLBACK) uncommitted rows.
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._db is not None:
            raise NotConnectedError("SqliteStore is already open")
        db: aiosqlite.Connection | None = None
        try:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self._path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={self._synchronous}")
            await db.execute("PRAGMA busy_timeout=10000")
            await db.executescript(_SCHEMA)
            await db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
            )
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                # A half-opened store must not stay open (nor make the next __aenter__ say "already open").
                await db.close()
            raise StoreError(f"cannot open SQLite store at {self._path}: {exc}") from exc
        self._db = db
        return self

    async def __aexit__(self, *exc: object) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise NotConnectedError("SqliteStore is not open: use 'async with SqliteStore(...)'")
        return self._db

    async def _write(self, statements: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        db = self._conn()
        try:
            async with self._lock:
                await self._write_locked(db, statements)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite write failed: {exc}") from exc

    @staticmethod
    async def _write_locked(
        db: aiosqlite.Connection, statements: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]
    ) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                if rows:
                    await db.executemany(sql, rows)
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await self._read_many([(sql, params)])

    async def _read_many(self, queries: Iterable[tuple[str, Sequence[Any]]]) -> list[sqlite3.Row]:
        """Rows of several queries, run back to back while no other coroutine uses the connection."""
        db = self._conn()
        rows: list[sqlite3.Row] = []
        try:
            async with self._lock:
                for sql, params in queries:
                    async with db.execute(sql, params) as cursor:
                        rows += await cursor.fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed: {exc}") from exc
        return rows

    async def insert_workflow(
        self, workflow: WorkflowRecord, tasks: Sequence[TaskRecord]
    ) -> WorkflowRecord | None:
        db = self._conn()
        # Encode before the transaction: a record that cannot be encoded fails here, having written nothing.
        workflow_row = _workflow_row(workflow)
        task_rows = [_task_row(t) for t in tasks]
        try:
            async with self._lock:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    async with db.execute(
                        "SELECT doc FROM workflows WHERE workflow_id = ?", (workflow.workflow_id,)
                    ) as cursor:
                        row = await cursor.fetchone()
                    if row is None:
                        await db.execute(_INSERT_WORKFLOW, workflow_row)
                        await db.executemany(_INSERT_TASK, task_rows)
                    await db.execute("COMMIT" if row is None else "ROLLBACK")
                except BaseException:
                    await _rollback(db)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite write failed: {exc}") from exc
        return None if row is None else WorkflowRecord.from_dict(_decode(row[0]))

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._read("SELECT doc FROM workflows WHERE workflow_id = ?", (workflow_id,))
        return WorkflowRecord.from_dict(_decode(rows[0][0])) if rows else None

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]:
        if task_ids is None:
            rows = await self._read(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE workflow_id = ?", (workflow_id,)
            )
        else:
            ids = list(dict.fromkeys(task_ids))
            queries = []
            # Stay well under SQLite's limit on bound parameters.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE workflow_id = ? AND task_id IN ({marks})"
                queries.append((sql, (workflow_id, *chunk)))
            rows = await self._read_many(queries)
        tasks = (_task_from_row(r) for r in rows)
        return {t.task_id: t for t in tasks}

    async def save(
        self, *, workflows: Sequence[WorkflowRecord] = (), tasks: Sequence[TaskRecord] = ()
    ) -> None:
        await self._write(
            [
                (_UPSERT_WORKFLOW, [_workflow_row(w) for w in workflows]),
                (_UPSERT_TASK, [_task_row(t) for t in tasks]),
            ]
        )

    async def mark_dispatched(self, keys: Sequence[tuple[str, str]]) -> None:
        self._conn()
        # A repeated key is harmless: its second UPDATE finds the task dispatched and changes nothing.
        rows = [(workflow_id, task_id) for workflow_id, task_id in keys]
        if rows:
            await self._write([(_MARK_DISPATCHED, rows)])

    async def undispatched(self, limit: int = 1000) -> list[TaskRecord]:
        rows = await self._read(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = 'queued' AND dispatched = 0 "
            "ORDER BY created_at LIMIT ?",
            (limit,),
        )
        return [_task_from_row(r) for r in rows]

    async def unnotified(self, limit: int = 1000) -> list[WorkflowRecord]:
        rows = await self._read(
            "SELECT doc FROM workflows WHERE status != 'running' AND notified = 0 "
            "ORDER BY created_at LIMIT ?",
            (limit,),
        )
        return [WorkflowRecord.from_dict(_decode(r[0])) for r in rows]

    async def list_workflows(
        self, *, status: WorkflowStatus | None = None, limit: int = 100
    ) -> list[WorkflowRecord]:
        if status is None:
            rows = await self._read("SELECT doc FROM workflows ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = await self._read(
                "SELECT doc FROM workflows WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                (str(status), limit),
            )
        return [WorkflowRecord.from_dict(_decode(r[0])) for r in rows]

    async def put_agent(self, agent: AgentRecord) -> None:
        await self._write(
            [
                (
                    "INSERT OR REPLACE INTO agents (agent_id, last_seen, doc) VALUES (?, ?, ?)",
                    [(agent.agent_id, agent.last_seen, codec.encode(agent.to_dict()))],
                )
            ]
        )

    async def list_agents(self) -> list[AgentRecord]:
        rows = await self._read("SELECT doc FROM agents ORDER BY agent_id")
        return [AgentRecord.from_dict(_decode(r[0])) for r in rows]

    async def ping(self) -> None:
        await self._write([("INSERT OR REPLACE INTO meta (key, value) VALUES ('ping', ?)", [("ok",)])])


async def _rollback(db: aiosqlite.Connection) -> None:
    """End a failed transaction, so that the connection can start the next one.

    A failed COMMIT may leave the transaction open (SQLITE_BUSY) or may already have rolled it back
    (SQLITE_FULL, SQLITE_IOERR); the error that got us here is the one worth raising, not this one's.
    """
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    """The task of a row selected as ``_TASK_COLUMNS``: its document, with ``dispatched`` from the column."""
    record = TaskRecord.from_dict(_decode(row[0]))
    record.dispatched = bool(row[1])
    return record


def _decode(blob: bytes) -> dict[str, Any]:
    try:
        value = codec.decode(blob)
    except ProtocolError as exc:
        raise StoreError(f"corrupt record in SQLite store: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError("corrupt record in SQLite store: not a mapping")
    return value
