"""Embedded durable state store on SQLite (the default).

WAL journal, ``synchronous=FULL`` by default so every committed batch survives a crash or power loss.
Records are stored as msgpack documents, with the columns the router queries by kept beside them.
The ``dispatched`` column of a task is authoritative: :meth:`SqliteStore.mark_dispatched` flips only the
column (never rewriting the document), and every read of a task takes ``dispatched`` from it.

Threading and group commit: one connection (stdlib :mod:`sqlite3`) lives on one dedicated thread, and
every store call is one hop to it: a read runs its queries there, a write transaction runs there from
``BEGIN IMMEDIATE`` to ``COMMIT`` in one function call, so nothing else ever runs on the connection in
the middle of a transaction and a read never sees a partial one. Writes (``insert_workflow``, ``save``,
``mark_dispatched``, ``put_agent``, ``ping``) are encoded by their caller, then queued; one flusher hands
everything queued (up to :data:`_MAX_BATCH_OPS` calls) to the thread, which applies the calls in the
order they were issued, each inside its own ``SAVEPOINT``, and commits them with one ``COMMIT`` (one
fsync). A call that fails is rolled back to its savepoint alone and only its caller gets
:class:`~fabric.errors.StoreError`. Every caller returns only after the ``COMMIT`` that holds its write,
so each write is as durable as ``synchronous`` makes it. Writes issued while a batch commits wait for the
next batch; there are no timers, so a lone write commits at once.

Small reads on the event loop: a second connection, read-only, on the event loop's own thread, answers
point reads (a workflow; up to :data:`_INLINE_ROWS` tasks) directly. Such a read costs SQLite tens of
microseconds, far less than the hop to the thread and back (a thread wake-up, a self-pipe write, an event
loop turn) it saves. WAL gives it a snapshot of committed data, as the thread's reads get; a read that
finds more rows than that, or meets a lock, goes to the thread. (A ``:memory:`` store has one connection:
every read hops.)

Write-behind of the ``dispatched`` flag: :meth:`SqliteStore.mark_dispatched` does not wait for a commit of
its own. The flips ride at the end of the next batch that commits anyway (the event that follows a publish
brings one within milliseconds), or commit on their own after :data:`_FLIP_DELAY_S` when no write comes.
Reads through the store see a flip at once (an overlay of the flips not yet handed to the thread), and a
later :meth:`SqliteStore.save` of the same task cancels its pending flip, so a flip never lands on a newer
version of the task. A crash before the flip is durable leaves the task ``queued`` and undispatched: the
router publishes it again at start, a duplicate message it already tolerates (execution is at-least-once
and the router records one terminal state per task); no task is ever marked dispatched without a confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from fabric.errors import NotConnectedError, ProtocolError, StoreError
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

log = logging.getLogger("fabric.store")

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
CREATE INDEX IF NOT EXISTS workflows_by_time ON workflows (created_at, workflow_id);
CREATE INDEX IF NOT EXISTS workflows_by_status ON workflows (status, created_at, workflow_id);
CREATE TABLE IF NOT EXISTS workflow_capabilities (
    capability  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    workflow_id TEXT NOT NULL,
    PRIMARY KEY (capability, created_at, workflow_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    workflow_id TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    dispatched  INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    doc         BLOB NOT NULL,
    capability  TEXT,
    ended_at    REAL,
    recall      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workflow_id, task_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_undispatched ON tasks (created_at)
    WHERE status = 'queued' AND dispatched = 0;
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (created_at) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS tasks_escalated ON tasks (created_at) WHERE status = 'escalated';
CREATE TABLE IF NOT EXISTS agents (
    agent_id  TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    doc       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (at REAL PRIMARY KEY, doc BLOB NOT NULL);
"""

#: Indexes over columns added in schema versions 2 and 3: created after :func:`_migrate` added them.
_INDEXES_V2 = """
CREATE INDEX IF NOT EXISTS tasks_dead ON tasks (ended_at, workflow_id, task_id) WHERE status = 'dead';
CREATE INDEX IF NOT EXISTS tasks_recalled ON tasks (workflow_id, task_id) WHERE recall = 1;
"""

_SCHEMA_VERSION = "3"

_INSERT_TASK = (
    "INSERT INTO tasks (workflow_id, task_id, status, dispatched, created_at, doc, capability, ended_at, "
    "recall) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_WORKFLOW = (
    "INSERT INTO workflows (workflow_id, status, notified, created_at, doc) VALUES (?, ?, ?, ?, ?)"
)
# save() replaces the whole record, so every column kept beside the document is updated with it
# (created_at included: the indexes must order by the same value the document holds).
_UPSERT_TASK = (
    f"{_INSERT_TASK} ON CONFLICT (workflow_id, task_id) DO UPDATE SET status = excluded.status, "
    "dispatched = excluded.dispatched, created_at = excluded.created_at, doc = excluded.doc, "
    "capability = excluded.capability, ended_at = excluded.ended_at, recall = excluded.recall"
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
    return (
        t.workflow_id,
        t.task_id,
        str(t.status),
        int(t.dispatched),
        t.created_at,
        doc,
        t.capability,
        parked_at(t),
        int(is_recalled(t)),
    )


def _workflow_row(w: WorkflowRecord) -> tuple[Any, ...]:
    return (w.workflow_id, str(w.status), int(w.notified), w.created_at, codec.encode(w.to_dict()))


_SELECT_WORKFLOW_DOC = "SELECT doc FROM workflows WHERE workflow_id = ?"
_INSERT_CAPABILITY = (
    "INSERT OR IGNORE INTO workflow_capabilities (capability, created_at, workflow_id) VALUES (?, ?, ?)"
)
_PUT_AGENT = "INSERT OR REPLACE INTO agents (agent_id, last_seen, doc) VALUES (?, ?, ?)"
_PING = "INSERT OR REPLACE INTO meta (key, value) VALUES ('ping', 'ok')"

#: Reads of at most this many rows run on the event loop's thread (see the module docstring).
_INLINE_ROWS = 64

#: A flip of ``dispatched`` no write came to carry commits on its own after this long (seconds).
_FLIP_DELAY_S = 0.2

#: At most this many write calls share one transaction...
_MAX_BATCH_OPS = 1000
#: ...and, unless a single call is bigger, at most this many rows.
_MAX_BATCH_ROWS = 20_000

_T = TypeVar("_T")
_Key = tuple[str, str]

#: One write call as it runs on the SQLite thread: its statements, and what its caller gets back.
_Apply = Callable[[sqlite3.Connection], Any]
#: How one write call ended: ``(True, result)``, or ``(False, exception)`` (``ok`` first, then the value).
_Outcome = tuple[bool, Any]


@dataclass(slots=True)
class _Write:
    """A write call waiting for the flusher."""

    apply: _Apply
    rows: int
    future: asyncio.Future[Any]


#: A batch of write calls handed to the thread, and its outcomes to come.
_Batch = tuple[list[_Write], asyncio.Future[list[_Outcome]]]


class SqliteStore:
    """State in one SQLite file.

    Closing the store commits the writes already queued, then closes the connection and its thread.

    Example:
        >>> async with SqliteStore("fabric.db") as store:
        ...     await store.list_workflows()
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self._path = str(path)
        self._synchronous = synchronous
        self._session: _Session | None = None

    async def __aenter__(self) -> Self:
        if self._session is not None:
            raise NotConnectedError("SqliteStore is already open")
        # One thread, for the life of the store: the connection is used on no other thread.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fabric-sqlite")
        try:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            db = await asyncio.get_running_loop().run_in_executor(
                thread, _connect, self._path, self._synchronous
            )
        except (sqlite3.Error, OSError) as exc:
            # A half-opened store must not stay open (nor make the next __aenter__ say "already open").
            thread.shutdown(wait=False)
            raise StoreError(f"cannot open SQLite store at {self._path}: {exc}") from exc
        except BaseException:
            thread.shutdown(wait=False)
            raise
        reader = None
        if self._path != ":memory:":
            try:
                reader = _connect_reader(self._path)
            except sqlite3.Error as exc:
                await asyncio.get_running_loop().run_in_executor(thread, db.close)
                thread.shutdown(wait=False)
                raise StoreError(f"cannot open SQLite store at {self._path}: {exc}") from exc
        self._session = _Session(db, thread, reader)
        return self

    async def __aexit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require(self) -> _Session:
        if self._session is None:
            raise NotConnectedError("SqliteStore is not open: use 'async with SqliteStore(...)'")
        return self._session

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._read_many([(sql, params)])

    async def _read_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[Any, ...]]:
        """Rows of several queries, read in one hop from one snapshot of committed data."""
        session = self._require()
        try:
            return await session.run(_fetch, queries)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed: {exc}") from exc

    async def _read_small(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of one query expected to be small: read inline when possible, else through the thread.

        ``sql`` must end with ``LIMIT ?``; it is bound here to one row more than an inline read takes.
        """
        rows = self._require().read_inline(sql, (*params, _INLINE_ROWS + 1))
        if rows is not None and len(rows) <= _INLINE_ROWS:
            return rows
        return await self._read(sql, (*params, -1))  # LIMIT -1: no limit

    async def insert_workflow(
        self, workflow: WorkflowRecord, tasks: Sequence[TaskRecord]
    ) -> WorkflowRecord | None:
        session = self._require()
        # Encode before queueing: a record that cannot be encoded fails here, having written nothing.
        workflow_row = _workflow_row(workflow)
        task_rows = [_task_row(t) for t in tasks]
        workflow_id = workflow.workflow_id
        capability_rows = [(c, workflow.created_at, workflow_id) for c in workflow.capabilities]

        def apply(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(_SELECT_WORKFLOW_DOC, (workflow_id,)).fetchone()
            if row is not None:
                return bytes(row[0])
            db.execute(_INSERT_WORKFLOW, workflow_row)
            db.executemany(_INSERT_TASK, task_rows)
            db.executemany(_INSERT_CAPABILITY, capability_rows)
            return None

        existing: bytes | None = await session.write(apply, 1 + len(task_rows))
        return None if existing is None else WorkflowRecord.from_dict(_decode(existing))

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._read_small(f"{_SELECT_WORKFLOW_DOC} LIMIT ?", (workflow_id,))
        return WorkflowRecord.from_dict(_decode(rows[0][0])) if rows else None

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]:
        # Flips not handed to the thread yet; those handed earlier commit before this read runs.
        flips = self._require().pending_flips()
        if task_ids is None:
            rows = await self._read_small(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE workflow_id = ? LIMIT ?", (workflow_id,)
            )
        else:
            ids = list(dict.fromkeys(task_ids))
            if not ids:
                self._require()
                return {}
            if len(ids) <= _INLINE_ROWS:
                marks = ",".join("?" * len(ids))
                rows = await self._read_small(
                    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE workflow_id = ? AND task_id IN ({marks}) "
                    "LIMIT ?",
                    (workflow_id, *ids),
                )
                return self._with_flips(rows, flips)
            queries = []
            # Stay well under SQLite's limit on bound parameters.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE workflow_id = ? AND task_id IN ({marks})"
                queries.append((sql, (workflow_id, *chunk)))
            rows = await self._read_many(queries)
        return self._with_flips(rows, flips)

    @staticmethod
    def _with_flips(rows: list[tuple[Any, ...]], flips: frozenset[_Key]) -> dict[str, TaskRecord]:
        found = {}
        for row in rows:
            task = _task_from_row(row)
            if flips and task.status is TaskStatus.QUEUED and task.key in flips:
                task.dispatched = True
            found[task.task_id] = task
        return found

    async def save(
        self, *, workflows: Sequence[WorkflowRecord] = (), tasks: Sequence[TaskRecord] = ()
    ) -> None:
        session = self._require()
        workflow_rows = [_workflow_row(w) for w in workflows]
        task_rows = [_task_row(t) for t in tasks]
        if not workflow_rows and not task_rows:
            return
        # This version of each task replaces the stored one: a flip requested before it must not land on it.
        session.cancel_flips(t.key for t in tasks)

        def apply(db: sqlite3.Connection) -> None:
            if workflow_rows:
                db.executemany(_UPSERT_WORKFLOW, workflow_rows)
            if task_rows:
                db.executemany(_UPSERT_TASK, task_rows)

        await session.write(apply, len(workflow_rows) + len(task_rows))

    async def mark_dispatched(self, keys: Sequence[tuple[str, str]]) -> None:
        """Written behind (see the module docstring): returns at once; reads see the flips at once."""
        self._require().flip_later(keys)

    async def undispatched(self, limit: int = 1000) -> list[TaskRecord]:
        flips = self._require().pending_flips()
        rows = await self._read(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = 'queued' AND dispatched = 0 "
            "ORDER BY created_at LIMIT ?",
            (limit + len(flips),),
        )
        tasks = [_task_from_row(r) for r in rows]
        return [t for t in tasks if t.key not in flips][:limit]

    async def leased(self, limit: int = 1000) -> list[TaskRecord]:
        # The lease lives in the document: running tasks are few (bounded by the workers' concurrency),
        # so they are read through their index and filtered here.
        rows = await self._read(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = 'running' ORDER BY created_at"
        )
        found = (_task_from_row(r) for r in rows)
        return [t for t in found if t.lease_s is not None][: max(limit, 0)]

    async def escalated(self, limit: int = 100) -> list[TaskRecord]:
        if limit <= 0:
            return []
        rows = await self._read(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = 'escalated' ORDER BY created_at LIMIT ?",
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

    async def query_workflows(
        self, query: WorkflowQuery = WorkflowQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowRecord]:
        check_limit(limit)
        after = decode_cursor(cursor, 1) if cursor else None
        where: list[str] = []
        params: list[Any] = []
        if query.capability is not None:
            # From the capability index, newest first; the status (if asked) is checked on the join.
            sql = (
                "SELECT w.doc, c.created_at, c.workflow_id FROM workflow_capabilities c "
                "JOIN workflows w ON w.workflow_id = c.workflow_id"
            )
            at, key = "c.created_at", "c.workflow_id"
            where.append("c.capability = ?")
            params.append(query.capability)
            if query.status is not None:
                where.append("w.status = ?")
                params.append(str(query.status))
        else:
            sql = "SELECT doc, created_at, workflow_id FROM workflows"
            at, key = "created_at", "workflow_id"
            if query.status is not None:
                where.append("status = ?")
                params.append(str(query.status))
        if query.since is not None:
            where.append(f"{at} >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append(f"{at} < ?")
            params.append(query.until)
        if after is not None:
            where.append(f"({at}, {key}) < (?, ?)")
            params += [after[0], after[1][0]]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {at} DESC, {key} DESC LIMIT ?"
        rows = await self._read(sql, (*params, limit + 1))
        items = [WorkflowRecord.from_dict(_decode(r[0])) for r in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(rows[limit - 1][1], rows[limit - 1][2]) if more else None
        return Page(items, next_cursor)

    async def query_dead(
        self, query: DeadQuery = DeadQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[TaskRecord]:
        check_limit(limit)
        after = decode_cursor(cursor, 2) if cursor else None
        # Every condition keeps ``status = 'dead'``, so the partial index tasks_dead serves the query.
        where = ["status = 'dead'"]
        params: list[Any] = []
        if query.capability is not None:
            where.append("capability = ?")
            params.append(query.capability)
        if query.since is not None:
            where.append("ended_at >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("ended_at < ?")
            params.append(query.until)
        if after is not None:
            where.append("(ended_at, workflow_id, task_id) < (?, ?, ?)")
            params += [after[0], *after[1]]
        sql = (
            f"SELECT {_TASK_COLUMNS}, ended_at, workflow_id, task_id FROM tasks "
            f"WHERE {' AND '.join(where)} ORDER BY ended_at DESC, workflow_id DESC, task_id DESC LIMIT ?"
        )
        rows = await self._read(sql, (*params, limit + 1))
        items = [_task_from_row(r) for r in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return Page(items, encode_cursor(last[2], last[3], last[4]) if last else None)

    async def recalled(
        self, *, limit: int = MAX_RECALLED, cursor: str | None = None
    ) -> Page[tuple[str, str]]:
        check_recalled_limit(limit)
        after = recalled_after(cursor)
        # Every condition keeps ``recall = 1``, so the partial index tasks_recalled serves the query.
        where, params = "recall = 1", []
        if after is not None:
            where += " AND (workflow_id, task_id) > (?, ?)"
            params = [*after]
        rows = await self._read(
            f"SELECT workflow_id, task_id FROM tasks WHERE {where} ORDER BY workflow_id, task_id LIMIT ?",
            (*params, limit + 1),
        )
        keys = [(str(r[0]), str(r[1])) for r in rows[:limit]]
        return Page(keys, recalled_cursor(keys[-1]) if len(rows) > limit else None)

    async def put_agent(self, agent: AgentRecord) -> None:
        session = self._require()
        row = (agent.agent_id, agent.last_seen, codec.encode(agent.to_dict()))

        def apply(db: sqlite3.Connection) -> None:
            db.execute(_PUT_AGENT, row)

        await session.write(apply, 1)

    async def list_agents(self) -> list[AgentRecord]:
        rows = await self._read("SELECT doc FROM agents ORDER BY agent_id")
        return [AgentRecord.from_dict(_decode(r[0])) for r in rows]

    async def prune_agents(self, agent_ids: Iterable[str], *, seen_before: float) -> list[str]:
        session = self._require()
        ids = list(dict.fromkeys(agent_ids))
        if not ids:
            return []

        def apply(db: sqlite3.Connection) -> list[str]:
            removed = []
            for agent_id in ids:
                cursor = db.execute(
                    "DELETE FROM agents WHERE agent_id = ? AND last_seen < ?", (agent_id, seen_before)
                )
                if cursor.rowcount:
                    removed.append(agent_id)
            return removed

        return list(await session.write(apply, len(ids)))

    async def known_capabilities(self) -> list[str]:
        rows = await self._read("SELECT DISTINCT capability FROM workflow_capabilities")
        found = {str(row[0]) for row in rows}
        found.update(c for agent in await self.list_agents() for c in agent.capabilities)
        return sorted(found)

    async def add_sample(self, sample: Sample, *, keep_since: float) -> None:
        session = self._require()
        row = (sample.at, codec.encode(sample.data))

        def apply(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO samples (at, doc) VALUES (?, ?)", row)
            db.execute("DELETE FROM samples WHERE at < ?", (keep_since,))
            db.execute(
                "DELETE FROM samples WHERE at < (SELECT at FROM samples ORDER BY at DESC LIMIT 1 OFFSET ?)",
                (MAX_SAMPLES - 1,),
            )

        await session.write(apply, 1)

    async def samples(self, since: float) -> list[Sample]:
        rows = await self._read(
            "SELECT at, doc FROM samples WHERE at >= ? ORDER BY at LIMIT ?", (since, MAX_SAMPLES)
        )
        return [Sample(at=r[0], data=_decode(r[1])) for r in rows]

    async def ping(self) -> None:
        await self._require().write(_ping, 1)


class _Session:
    """One open store: the connection, the one thread that uses it, and the writes queued for it.

    Everything but the functions run on the thread (below, after the class) is used from the event loop.
    """

    def __init__(
        self, db: sqlite3.Connection, thread: ThreadPoolExecutor, reader: sqlite3.Connection | None
    ) -> None:
        self._db = db
        self._thread = thread
        #: Read-only connection used on the event loop's thread (None for ``:memory:``).
        self._reader = reader
        #: Flips handed to the thread whose commit has not been settled yet (an inline read may not see
        #: them committed); by key, how many batches carry it.
        self._flips_in_flight: dict[_Key, int] = {}
        self._queue: deque[_Write] = deque()
        self._flusher: asyncio.Task[None] | None = None
        #: Flips of ``dispatched`` requested and not yet handed to the thread (an ordered set).
        self._flips: dict[_Key, None] = {}
        self._flip_timer: asyncio.TimerHandle | None = None

    def flip_later(self, keys: Iterable[_Key]) -> None:
        """Flip ``dispatched`` on these tasks with the next batch, or on its own after a short delay."""
        for key in keys:
            self._flips[key] = None
        if self._flips and self._flusher is None and self._flip_timer is None:
            self._flip_timer = asyncio.get_running_loop().call_later(_FLIP_DELAY_S, self._flip_now)

    def cancel_flips(self, keys: Iterable[_Key]) -> None:
        if self._flips:
            for key in keys:
                self._flips.pop(key, None)

    def pending_flips(self) -> frozenset[_Key]:
        """The flips a read issued now may not find committed: those not handed to the thread, and those
        handed whose commit has not been settled (an inline read does not queue behind them)."""
        if not self._flips and not self._flips_in_flight:
            return frozenset()
        return frozenset(self._flips) | frozenset(self._flips_in_flight)

    def read_inline(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
        """Rows of ``sql`` read on the calling (event loop) thread; None when they must be read through
        the thread instead (no reader connection, or SQLite refused, e.g. busy)."""
        if self._reader is None:
            return None
        try:
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error:
            return None

    def _flip_now(self) -> None:
        self._flip_timer = None
        if self._flips and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(self._start()))

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(db, *args)`` on the SQLite thread, after everything handed to it before."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, self._db, *args)

    async def write(self, apply: _Apply, rows: int) -> Any:
        """Queue a write call; return its result once the transaction that holds it has committed.

        ``rows`` only sizes batches. A caller cancelled before the flusher took its call writes nothing;
        once taken, the call commits (or fails) with its batch whether or not anyone still waits.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Write(apply, rows, future))
        if self._flusher is None:
            # Nothing is committing: hand this write to the thread now, not an event loop turn later.
            self._flusher = asyncio.create_task(self._flush(self._start()))
        return await future

    def _start(self) -> _Batch | None:
        """Hand the next batch to the thread; None when nothing is left to write."""
        while batch := self._take():
            try:
                running = asyncio.get_running_loop().run_in_executor(
                    self._thread, _commit, self._db, [w.apply for w in batch]
                )
            except Exception as exc:  # the thread is gone (a cancelled close shut it down)
                for w in batch:
                    _settle(w.future, (False, exc))
                continue
            return batch, running
        return None

    async def _flush(self, started: _Batch | None) -> None:
        """Wait for each batch to commit and settle its callers; meanwhile new writes queue for the next."""
        try:
            while started is not None:
                batch, running = started
                try:
                    outcomes = await running
                except Exception as exc:
                    # Only if the thread itself failed (_commit reports the errors of calls as outcomes).
                    outcomes = [(False, exc)] * len(batch)
                except BaseException:
                    for w in batch:
                        unsure = StoreError("SQLite store shut down before this write was confirmed")
                        _settle(w.future, (False, unsure))
                    raise
                for w, outcome in zip(batch, outcomes, strict=True):
                    _settle(w.future, outcome)
                started = self._start()
        finally:
            self._flusher = None
            # Writes are left over only when this task was cancelled (the event loop is going away).
            while self._queue:
                not_written = StoreError("SQLite store shut down before the write was made")
                _settle(self._queue.popleft().future, (False, not_written))

    def _take(self) -> list[_Write]:
        """The next batch: calls in the order they were issued, skipping those whose caller gave up."""
        batch: list[_Write] = []
        rows = 0
        while self._queue and len(batch) < _MAX_BATCH_OPS:
            write = self._queue[0]
            if batch and rows + write.rows > _MAX_BATCH_ROWS:
                break
            self._queue.popleft()
            if not write.future.cancelled():
                batch.append(write)
                rows += write.rows
        if self._flips:
            # Last in the batch: every write issued before a flip was requested precedes it, and a save
            # issued after it cancelled it (cancel_flips), so a flip only ever lands on its own version.
            batch.append(self._flip_write(list(self._flips)))
            self._flips.clear()
        return batch

    def _flip_write(self, keys: list[_Key]) -> _Write:
        def apply(db: sqlite3.Connection) -> None:
            # A repeated key is harmless: its second UPDATE finds the task dispatched and changes nothing.
            db.executemany(_MARK_DISPATCHED, keys)

        in_flight = self._flips_in_flight
        for key in keys:
            in_flight[key] = in_flight.get(key, 0) + 1

        def settled(future: asyncio.Future[Any]) -> None:
            for key in keys:
                left = in_flight.pop(key, 1) - 1
                if left > 0:
                    in_flight[key] = left
            _log_failed_flip(future)

        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(settled)
        return _Write(apply, len(keys), future)

    async def close(self) -> None:
        """Commit the writes already queued, then close the connection and end the thread."""
        if self._flip_timer is not None:
            self._flip_timer.cancel()
            self._flip_timer = None
        if self._flips and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(self._start()))
        try:
            if self._flusher is not None:
                await asyncio.shield(self._flusher)
        finally:
            if self._reader is not None:
                self._reader.close()
            # Handed to the thread after every read and batch before it, so it runs last.
            closing = asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
            self._thread.shutdown(wait=False)
            with contextlib.suppress(sqlite3.Error):
                await closing


def _log_failed_flip(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # The tasks stay undispatched in the store: recovery publishes them again (a harmless duplicate).
        log.warning("recording publish confirms failed: %s", future.exception())


def _settle(future: asyncio.Future[Any], outcome: _Outcome) -> None:
    """Hand one caller the outcome of its write call, with errors translated into StoreError."""
    if future.done():  # its caller was cancelled
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    elif isinstance(value, StoreError):
        future.set_exception(value)
    else:
        # Whatever went wrong on the SQLite thread (sqlite3.Error; OverflowError binding an int SQLite cannot
        # hold; the thread refusing work) reaches the caller as a StoreError, each caller its own.
        error = StoreError(f"SQLite write failed: {value}")
        error.__cause__ = value
        future.set_exception(error)


# -- run on the SQLite thread only ---------------------------------------------------------------------


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, every BEGIN here is explicit. check_same_thread
    # stays on: the connection belongs to the thread that opens it.
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        _migrate(db)
        db.executescript(_INDEXES_V2)
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
        )
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(path: str) -> sqlite3.Connection:
    """The read-only connection of the event loop's thread (the schema exists: the writer made it)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA query_only=1")
        # A reader of a WAL database waits for a lock only in rare moments (a checkpoint that restarts the
        # log, recovery); never for long on the event loop: past this it goes through the thread.
        db.execute("PRAGMA busy_timeout=50")
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file written by an older fabric to the current schema (a no-op on a new file).

    Version 2 adds the ``capability`` and ``ended_at`` columns of tasks (filled here for dead tasks, the
    only ones queried by them; other tasks get them at their next save). Workflows stored before
    version 2 have no capabilities recorded, so a capability filter does not find them.

    Version 3 adds the ``recall`` column (0 for every stored task: a fabric before version 3 never
    recorded which cancelled tasks had copies out).
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    if "capability" in columns and "recall" in columns:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if "capability" not in columns:
            db.execute("ALTER TABLE tasks ADD COLUMN capability TEXT")
            db.execute("ALTER TABLE tasks ADD COLUMN ended_at REAL")
            dead = db.execute("SELECT doc FROM tasks WHERE status = 'dead'").fetchall()
            for (blob,) in dead:
                task = TaskRecord.from_dict(_decode(blob))
                db.execute(
                    "UPDATE tasks SET capability = ?, ended_at = ? WHERE workflow_id = ? AND task_id = ?",
                    (task.capability, parked_at(task), task.workflow_id, task.task_id),
                )
        if "recall" not in columns:
            db.execute("ALTER TABLE tasks ADD COLUMN recall INTEGER NOT NULL DEFAULT 0")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _fetch(db: sqlite3.Connection, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[Any, ...]]:
    """Rows of ``queries``; several of them share one read transaction, so one snapshot."""
    if len(queries) == 1:
        sql, params = queries[0]
        return db.execute(sql, params).fetchall()
    rows: list[tuple[Any, ...]] = []
    db.execute("BEGIN")
    try:
        for sql, params in queries:
            rows += db.execute(sql, params).fetchall()
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return rows


def _commit(db: sqlite3.Connection, calls: Sequence[_Apply]) -> list[_Outcome]:
    """Apply write calls in order in one transaction, each inside its own savepoint, and commit once.

    A call that fails is rolled back to its savepoint and reported as failed; the others go on. If its
    error ended the whole transaction (SQLite does so on SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, ...),
    the calls before it were rolled back with it: the failed call is set aside and the rest run again in a
    new transaction. When ``BEGIN``, a savepoint statement or ``COMMIT`` fails, no call is to blame and
    nothing of the batch is committed: each call that had not failed on its own fails with that error.
    """
    outcomes: list[_Outcome] = [(False, None)] * len(calls)
    todo = list(range(len(calls)))
    while todo:
        done: dict[int, _Outcome] = {}
        culprit: int | None = None
        try:
            db.execute("BEGIN IMMEDIATE")
            for i in todo:
                db.execute("SAVEPOINT call")
                try:
                    done[i] = (True, calls[i](db))
                except Exception as exc:
                    done[i] = (False, exc)
                    if not _rollback_to_savepoint(db):
                        culprit = i
                        break
                else:
                    db.execute("RELEASE call")
            if culprit is None:
                db.execute("COMMIT")
        except Exception as exc:
            _rollback(db)
            for i in todo:
                own = done.get(i)
                outcomes[i] = own if own is not None and not own[0] else (False, exc)
            return outcomes
        except BaseException:
            _rollback(db)
            raise
        if culprit is None:
            for i in todo:
                outcomes[i] = done[i]
            return outcomes
        _rollback(db)
        outcomes[culprit] = done[culprit]
        todo.remove(culprit)
    return outcomes


def _rollback_to_savepoint(db: sqlite3.Connection) -> bool:
    """Undo the failed call alone; False when its error ended the transaction (or undoing it failed)."""
    if not db.in_transaction:
        return False
    try:
        db.execute("ROLLBACK TO call")
        db.execute("RELEASE call")
    except sqlite3.Error:
        return False
    return True


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, so that the connection can start the next one.

    A failed COMMIT may leave the transaction open (SQLITE_BUSY) or may already have rolled it back
    (SQLITE_FULL, SQLITE_IOERR); the error that got us here is the one worth raising, not this one's.
    """
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _ping(db: sqlite3.Connection) -> None:
    db.execute(_PING)


def _task_from_row(row: tuple[Any, ...]) -> TaskRecord:
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
