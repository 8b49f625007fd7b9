"""State store on Redis: for fabrics whose routers should not keep state on their own disk.

Every key starts with the store's prefix (``{namespace}:``), so several fabrics, and every test, can share
one Redis without seeing each other. Records are msgpack documents (through :mod:`fabric.protocol.codec`);
the indexes the router queries by are kept beside them and are only ever written in the same
``MULTI``/``EXEC`` transaction as the documents they index::

    {prefix}wf:{workflow_id}          string      msgpack document of the workflow
    {prefix}tasks:{workflow_id}       hash        task_id -> msgpack document of the task
    {prefix}wf_index                  sorted set  workflow ids by created_at (list_workflows)
    {prefix}wf_status:{status}        sorted set  workflow ids with that status, by created_at
    {prefix}unnotified                sorted set  finished workflows not yet notified, by created_at
    {prefix}wf_cap:{capability}       sorted set  ids of workflows with a task of that capability, by
                                                  created_at (written once, with the workflow)
    {prefix}undispatched              sorted set  "{workflow_id}\\x1f{task_id}" of tasks queued but not
                                                  dispatched, by created_at
    {prefix}dead                      sorted set  "{workflow_id}\\x1f{task_id}" of dead tasks, by finished_at
    {prefix}dead_cap:{capability}     sorted set  the same, for one capability
    {prefix}leased                    sorted set  "{workflow_id}\\x1f{task_id}" of tasks running under a
                                                  lease, by created_at
    {prefix}escalated                 sorted set  "{workflow_id}\\x1f{task_id}" of escalated tasks, by
                                                  created_at
    {prefix}recall                    sorted set  "{workflow_id}\\x1f{task_id}" of cancelled tasks with
                                                  ``recall`` set, all scored 0 (listed by member)
    {prefix}agents                    hash        agent_id -> msgpack document of the agent
    {prefix}ping                      string      written by :meth:`RedisStore.ping`

Every connection has a connect timeout and a socket (read/write) timeout, and a failed command is retried
once on a new connection, so a silent network partition makes a store call fail with
:class:`~fabric.errors.StoreError` after a bounded time instead of blocking it forever.

Redis does not roll back an ``EXEC`` in which one command fails at run time. The commands here can only
fail that way on a key of the wrong type (someone else writing under our prefix); an out-of-memory server
refuses them while they are queued, which aborts the whole transaction (``EXECABORT``).

This is the only module that imports :mod:`redis`; every redis exception is translated into
:class:`~fabric.errors.StoreError` here, with ``raise ... from exc``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError
from redis.typing import EncodableT, FieldT

from fabric.errors import ConfigError, NotConnectedError, ProtocolError, StoreError
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

#: Separates workflow id and task id in members of the ``undispatched`` index. Neither id may contain it
#: (docs/protocol.md §2 restricts both to ``[A-Za-z0-9_.:-]``).
_MEMBER_SEP = "\x1f"
#: How often :meth:`RedisStore.insert_workflow` and :meth:`RedisStore.mark_dispatched` retry when another
#: client touched a watched key between WATCH and EXEC; after that the keys are contended and we give up
#: loudly.
_WATCH_RETRIES = 5
#: Ids fetched per HMGET / keys deleted per UNLINK, to keep single commands (and server latency) small.
_CHUNK = 1000
#: Seconds to wait for a TCP connection before declaring Redis unreachable (a URL option overrides it).
_CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for Redis to answer (or take) one command before declaring it unreachable, so a silent
#: partition cannot block a store call forever (a URL option overrides it).
#: Connections to Redis at most; more concurrent calls wait for one.
_MAX_CONNECTIONS = 64
_SOCKET_TIMEOUT_S = 10.0
#: Retries of a command that failed on a connection error or timeout, each on a new connection. One
#: retry survives a pooled connection the server closed while idle; redis-py's default (10) would make a
#: partitioned store call last eleven socket timeouts before it fails.
_COMMAND_RETRIES = 1
#: Index entries one query call reads at most before it returns a (possibly short) page with a cursor,
#: when entries must be filtered beyond what the index holds (status and capability both given).
_MAX_SCAN = 5000

_R = TypeVar("_R")

#: A position in a newest-first listing: the sort time, then the id parts.
_Position = tuple[float, tuple[str, ...]]


class RedisStore:
    """State in Redis, under keys that all start with ``prefix``.

    Args:
        url: a ``redis://`` or ``rediss://`` (or ``unix://``) URL, as accepted by redis-py.
        prefix: the start of every key this store reads or writes; carries the namespace.
        socket_timeout: seconds a command may wait for Redis before it fails with StoreError.
        connect_timeout: seconds a new connection may take before it fails with StoreError.

    Raises:
        ConfigError: ``prefix`` is empty (the store would then own, and purge, the whole database), or a
            timeout is not positive.

    Example:
        >>> async with RedisStore("redis://127.0.0.1:6379/0", prefix="fabric:") as store:
        ...     await store.ping()
        ...     workflows = await store.list_workflows(limit=10)
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fabric:",
        socket_timeout: float = _SOCKET_TIMEOUT_S,
        connect_timeout: float = _CONNECT_TIMEOUT_S,
    ) -> None:
        if not prefix:
            raise ConfigError("RedisStore: prefix must not be empty (it is the namespace of every key)")
        if socket_timeout <= 0 or connect_timeout <= 0:
            raise ConfigError("RedisStore: socket_timeout and connect_timeout must be positive")
        self._url = url
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._safe_url = _redact(url)
        self._prefix = prefix
        self._client: aioredis.Redis | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect and PING.

        Raises:
            NotConnectedError: the store is already open.
            ConfigError: the URL cannot be parsed.
            StoreError: Redis does not answer at the URL.
        """
        if self._client is not None:
            raise NotConnectedError("RedisStore is already open")
        try:
            # A blocking pool: a burst of concurrent calls beyond the pool waits for a connection
            # instead of failing with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=_MAX_CONNECTIONS,
                timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                socket_timeout=self._socket_timeout,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.01), _COMMAND_RETRIES),
            )
            client = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        except ValueError as exc:
            raise ConfigError(f"FABRIC_STORE__URL: invalid Redis URL {self._safe_url}: {exc}") from exc
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(f"cannot reach Redis store at {self._safe_url}: {exc}") from exc
        self._client = client
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the connection pool; the store can be opened again afterwards."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _conn(self) -> aioredis.Redis:
        if self._client is None:
            raise NotConnectedError("RedisStore is not open: use 'async with RedisStore(...)'")
        return self._client

    @contextlib.contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        """The one boundary where redis exceptions become :class:`StoreError`."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis {operation} failed at {self._safe_url}: {exc}") from exc

    # -- keys ------------------------------------------------------------------------------------------

    def _wf_key(self, workflow_id: str) -> str:
        return f"{self._prefix}wf:{workflow_id}"

    def _tasks_key(self, workflow_id: str) -> str:
        return f"{self._prefix}tasks:{workflow_id}"

    def _status_key(self, status: WorkflowStatus) -> str:
        return f"{self._prefix}wf_status:{status}"

    def _capability_key(self, capability: str) -> str:
        return f"{self._prefix}wf_cap:{capability}"

    @property
    def _dead_key(self) -> str:
        return f"{self._prefix}dead"

    def _dead_capability_key(self, capability: str) -> str:
        return f"{self._prefix}dead_cap:{capability}"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}wf_index"

    @property
    def _undispatched_key(self) -> str:
        return f"{self._prefix}undispatched"

    @property
    def _leased_key(self) -> str:
        return f"{self._prefix}leased"

    @property
    def _escalated_key(self) -> str:
        return f"{self._prefix}escalated"

    @property
    def _recall_key(self) -> str:
        return f"{self._prefix}recall"

    @property
    def _unnotified_key(self) -> str:
        return f"{self._prefix}unnotified"

    @property
    def _agents_key(self) -> str:
        return f"{self._prefix}agents"

    @property
    def _samples_key(self) -> str:
        return f"{self._prefix}samples"

    # -- writes ----------------------------------------------------------------------------------------

    def _queue_workflows(self, pipe: Pipeline, workflows: Iterable[WorkflowRecord]) -> None:
        """Add the commands writing ``workflows`` and their index entries to ``pipe`` (inside MULTI)."""
        for wf in workflows:
            wid = wf.workflow_id
            pipe.set(self._wf_key(wid), codec.encode(wf.to_dict()))
            pipe.zadd(self._index_key, {wid: wf.created_at})
            for status in WorkflowStatus:
                if status is wf.status:
                    pipe.zadd(self._status_key(status), {wid: wf.created_at})
                else:
                    # The previous status is unknown without a read; removing from the others is cheaper.
                    pipe.zrem(self._status_key(status), wid)
            if wf.status.terminal and not wf.notified:
                pipe.zadd(self._unnotified_key, {wid: wf.created_at})
            else:
                pipe.zrem(self._unnotified_key, wid)

    def _queue_tasks(self, pipe: Pipeline, tasks: Iterable[TaskRecord]) -> None:
        """Add the commands writing ``tasks`` and their index entries to ``pipe`` (inside MULTI)."""
        docs: dict[str, dict[FieldT, EncodableT]] = {}
        ready: dict[str, float] = {}
        not_ready: list[str] = []
        # Dead-task index, per capability: member -> parked time (dead) or None (not dead), last one wins.
        dead: dict[str, dict[str, float | None]] = {}
        leased: dict[str, float] = {}
        not_leased: list[str] = []
        escalated: dict[str, float] = {}
        not_escalated: list[str] = []
        # Only a cancelled task can be recalled, and a cancelled task stays cancelled: others need no ZREM.
        recall: dict[str, bool] = {}
        for task in tasks:
            docs.setdefault(task.workflow_id, {})[task.task_id] = codec.encode(task.to_dict())
            member = f"{task.workflow_id}{_MEMBER_SEP}{task.task_id}"
            if task.status is TaskStatus.QUEUED and not task.dispatched:
                ready[member] = task.created_at
            else:
                ready.pop(member, None)  # a later version in the same batch wins
                not_ready.append(member)
            parked = parked_at(task) if task.status is TaskStatus.DEAD else None
            dead.setdefault(task.capability, {})[member] = parked
            if task.status is TaskStatus.RUNNING and task.lease_s is not None:
                leased[member] = task.created_at
            else:
                leased.pop(member, None)
                not_leased.append(member)
            if task.status is TaskStatus.ESCALATED:
                escalated[member] = task.created_at
            else:
                escalated.pop(member, None)
                not_escalated.append(member)
            if task.status is TaskStatus.CANCELLED:
                recall[member] = is_recalled(task)
        for workflow_id, mapping in docs.items():
            pipe.hset(self._tasks_key(workflow_id), mapping=mapping)
        gone = [m for m in dict.fromkeys(not_ready) if m not in ready]
        for start in range(0, len(gone), _CHUNK):
            pipe.zrem(self._undispatched_key, *gone[start : start + _CHUNK])
        if ready:
            pipe.zadd(self._undispatched_key, ready)
        for capability, entries in dead.items():
            parked_now = {m: at for m, at in entries.items() if at is not None}
            alive = [m for m, at in entries.items() if at is None]
            for key in (self._dead_key, self._dead_capability_key(capability)):
                for start in range(0, len(alive), _CHUNK):
                    pipe.zrem(key, *alive[start : start + _CHUNK])
                if parked_now:
                    pipe.zadd(key, parked_now)
        gone = [m for m in dict.fromkeys(not_leased) if m not in leased]
        for start in range(0, len(gone), _CHUNK):
            pipe.zrem(self._leased_key, *gone[start : start + _CHUNK])
        if leased:
            pipe.zadd(self._leased_key, leased)
        gone = [m for m in dict.fromkeys(not_escalated) if m not in escalated]
        for start in range(0, len(gone), _CHUNK):
            pipe.zrem(self._escalated_key, *gone[start : start + _CHUNK])
        if escalated:
            pipe.zadd(self._escalated_key, escalated)
        unrecalled = [m for m, on in recall.items() if not on]
        for start in range(0, len(unrecalled), _CHUNK):
            pipe.zrem(self._recall_key, *unrecalled[start : start + _CHUNK])
        recalled = {m: 0.0 for m, on in recall.items() if on}
        if recalled:
            pipe.zadd(self._recall_key, recalled)

    async def insert_workflow(
        self, workflow: WorkflowRecord, tasks: Sequence[TaskRecord]
    ) -> WorkflowRecord | None:
        """Atomically store a new workflow and its tasks, unless the id is taken.

        The workflow key is WATCHed, read, and written with the tasks and indexes in one ``MULTI``/
        ``EXEC``: a crash or a lost connection leaves either the whole workflow or nothing.

        Args:
            workflow: the new workflow.
            tasks: all of its tasks.

        Returns:
            None when stored; the existing record (and nothing written) when the id is taken.

        Raises:
            NotConnectedError: the store is not open.
            ProtocolError: a record holds a value msgpack cannot encode (nothing is written).
            StoreError: Redis failed, or the id stayed contended through every retry.
        """
        client = self._conn()
        wf_key = self._wf_key(workflow.workflow_id)
        with self._translate("insert_workflow"):
            for _ in range(_WATCH_RETRIES):
                async with client.pipeline(transaction=True) as pipe:
                    await pipe.watch(wf_key)
                    existing = await pipe.get(wf_key)
                    if existing is not None:
                        return WorkflowRecord.from_dict(_decode(existing))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    # Tasks saved earlier without their workflow are replaced, not merged (as in MemoryStore).
                    pipe.delete(self._tasks_key(workflow.workflow_id))
                    self._queue_workflows(pipe, [workflow])
                    for capability in workflow.capabilities:
                        pipe.zadd(
                            self._capability_key(capability), {workflow.workflow_id: workflow.created_at}
                        )
                    self._queue_tasks(pipe, tasks)
                    try:
                        await pipe.execute()
                    except WatchError:
                        continue  # someone wrote the workflow meanwhile: read it again
                    return None
        raise StoreError(
            f"insert_workflow {workflow.workflow_id!r}: the key kept changing during {_WATCH_RETRIES} tries"
        )

    async def save(
        self, *, workflows: Sequence[WorkflowRecord] = (), tasks: Sequence[TaskRecord] = ()
    ) -> None:
        """Write these records and their index entries in one ``MULTI``/``EXEC``, replacing stored versions.

        Args:
            workflows: workflow records to write.
            tasks: task records to write.

        Raises:
            NotConnectedError: the store is not open.
            ProtocolError: a record holds a value msgpack cannot encode (nothing is written).
            StoreError: Redis failed; nothing of the batch is visible.
        """
        client = self._conn()
        if not workflows and not tasks:
            return
        with self._translate("save"):
            async with client.pipeline(transaction=True) as pipe:
                # Records are encoded while queueing, before anything is sent: one that cannot be encoded
                # raises here and the pipeline is discarded, so nothing of the batch is written.
                self._queue_workflows(pipe, workflows)
                self._queue_tasks(pipe, tasks)
                await pipe.execute()

    async def mark_dispatched(self, keys: Sequence[tuple[str, str]]) -> None:
        """Set ``dispatched`` on each of these tasks that is still stored ``queued`` and not dispatched.

        The task hashes of the workflows involved are WATCHed and the stored documents read; only those
        still queued and undispatched are changed, field ``dispatched`` alone (every other field of the
        document is written back as read), and written with their removal from the ``undispatched``
        index in one ``MULTI``/``EXEC``. If another client wrote one of the hashes meanwhile, the
        documents are read again. Unknown keys are ignored.

        Args:
            keys: ``(workflow_id, task_id)`` of the tasks whose publish the broker confirmed.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed, a stored document is corrupt, or the hashes stayed contended
                through every retry; nothing of the call is written.
        """
        client = self._conn()
        wanted: dict[str, dict[str, None]] = {}
        for workflow_id, task_id in keys:
            wanted.setdefault(workflow_id, {})[task_id] = None
        if not wanted:
            return
        hashes = {workflow_id: self._tasks_key(workflow_id) for workflow_id in wanted}
        contention: WatchError | None = None
        with self._translate("mark_dispatched"):
            for _ in range(_WATCH_RETRIES):
                async with client.pipeline(transaction=True) as pipe:
                    await pipe.watch(*hashes.values())
                    flipped: dict[str, dict[FieldT, EncodableT]] = {}
                    members: list[str] = []
                    for workflow_id, task_ids in wanted.items():
                        ids = list(task_ids)
                        for start in range(0, len(ids), _CHUNK):
                            chunk = ids[start : start + _CHUNK]
                            blobs = await pipe.hmget(hashes[workflow_id], chunk)
                            for task_id, blob in zip(chunk, blobs, strict=True):
                                if blob is None:
                                    continue  # unknown task: ignored
                                doc = _decode(blob)
                                if doc.get("status") != str(TaskStatus.QUEUED) or doc.get("dispatched"):
                                    continue  # moved on (or confirmed) meanwhile: never move it back
                                # The document as stored, with this one field changed: no record the
                                # caller holds, nor a round trip through TaskRecord, rewrites the rest.
                                doc["dispatched"] = True
                                flipped.setdefault(workflow_id, {})[task_id] = codec.encode(doc)
                                members.append(f"{workflow_id}{_MEMBER_SEP}{task_id}")
                    if not flipped:
                        return  # nothing to change; leaving the block UNWATCHes
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for workflow_id, mapping in flipped.items():
                        pipe.hset(hashes[workflow_id], mapping=mapping)
                    for start in range(0, len(members), _CHUNK):
                        pipe.zrem(self._undispatched_key, *members[start : start + _CHUNK])
                    try:
                        await pipe.execute()
                    except WatchError as exc:
                        contention = exc
                        continue  # a watched hash changed: read the documents again
                    return
        raise StoreError(
            f"mark_dispatched: the task hashes of {len(hashes)} workflow(s) kept changing during "
            f"{_WATCH_RETRIES} tries"
        ) from contention

    async def put_agent(self, agent: AgentRecord) -> None:
        """Insert or replace an agent record.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed.
        """
        client = self._conn()
        doc = codec.encode(agent.to_dict())
        with self._translate("put_agent"):
            await client.hset(self._agents_key, agent.agent_id, doc)

    async def add_sample(self, sample: Sample, *, keep_since: float) -> None:
        """Append a sample (a sorted set scored by time) and trim the old ones, in one transaction.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed.
        """
        client = self._conn()
        member = codec.encode(sample.to_dict())
        with self._translate("add_sample"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._samples_key, {member: sample.at})
                pipe.zremrangebyscore(self._samples_key, "-inf", f"({keep_since!r}")
                pipe.zremrangebyrank(self._samples_key, 0, -MAX_SAMPLES - 1)
                await pipe.execute()

    async def samples(self, since: float) -> list[Sample]:
        """Samples taken at or after ``since``, oldest first.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        client = self._conn()
        with self._translate("samples"):
            members = await client.zrangebyscore(self._samples_key, repr(since), "+inf", 0, MAX_SAMPLES)
        return [Sample.from_dict(_decode(m)) for m in members]

    async def ping(self) -> None:
        """Raise StoreError unless Redis answers and accepts a write.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis did not answer, or refused the write (for example a read-only replica).
        """
        client = self._conn()
        with self._translate("ping"):
            await client.ping()
            await client.set(f"{self._prefix}ping", b"ok")

    async def purge(self) -> None:
        """Delete every key under this store's prefix (SCAN + UNLINK). For tests and teardown.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed.
        """
        client = self._conn()
        pattern = _glob_escape(self._prefix) + "*"
        with self._translate("purge"):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=_CHUNK):
                batch.append(key)
                if len(batch) >= _CHUNK:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)

    # -- reads -----------------------------------------------------------------------------------------

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        """The workflow record, or None.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or the stored document is corrupt.
        """
        client = self._conn()
        with self._translate("get_workflow"):
            raw = await client.get(self._wf_key(workflow_id))
        return None if raw is None else WorkflowRecord.from_dict(_decode(raw))

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]:
        """Tasks of a workflow by id: all of them, or only ``task_ids`` (unknown ids are left out).

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        client = self._conn()
        key = self._tasks_key(workflow_id)
        blobs: list[object] = []
        with self._translate("get_tasks"):
            if task_ids is None:
                blobs = list((await client.hgetall(key)).values())
            else:
                ids = list(dict.fromkeys(task_ids))
                for start in range(0, len(ids), _CHUNK):
                    found = await client.hmget(key, ids[start : start + _CHUNK])
                    blobs += [b for b in found if b is not None]
        records = (TaskRecord.from_dict(_decode(b)) for b in blobs)
        return {t.task_id: t for t in records}

    async def undispatched(self, limit: int = 1000) -> list[TaskRecord]:
        """Tasks that are ``queued`` but whose publish was not confirmed, oldest first.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        records = await self._indexed_tasks(self._undispatched_key, limit, "undispatched")
        # The index is written with the documents, so this only filters a race with a concurrent save.
        return [t for t in records if t.status is TaskStatus.QUEUED and not t.dispatched]

    async def _indexed_tasks(self, index_key: str, limit: int, operation: str) -> list[TaskRecord]:
        """The first ``limit`` tasks of a sorted index of ``workflow_id<sep>task_id`` members (oldest
        first), as stored now; members whose task is gone are left out."""
        client = self._conn()
        if limit <= 0:
            return []
        with self._translate(operation):
            members = await client.zrange(index_key, 0, limit - 1)
            pipe = client.pipeline(transaction=False)
            for member in members:
                workflow_id, _, task_id = _text(member).partition(_MEMBER_SEP)
                pipe.hget(self._tasks_key(workflow_id), task_id)
            blobs: list[object] = await pipe.execute() if members else []
        return [TaskRecord.from_dict(_decode(b)) for b in blobs if b is not None]

    async def recalled(
        self, *, limit: int = MAX_RECALLED, cursor: str | None = None
    ) -> Page[tuple[str, str]]:
        """Cancelled tasks with ``recall`` set, one page ascending by key (see the StateStore contract).

        Raises:
            ValueError: bad ``cursor`` or ``limit``.
            NotConnectedError: the store is not open.
            StoreError: Redis failed.
        """
        check_recalled_limit(limit)
        after = recalled_after(cursor)
        # All members score 0, so ZRANGE BYLEX walks them by member: by workflow id, then task id (the
        # separator sorts below every id character).
        low = "-" if after is None else f"({after[0]}{_MEMBER_SEP}{after[1]}"
        client = self._conn()
        with self._translate("recalled"):
            members = await client.zrange(self._recall_key, low, "+", bylex=True, offset=0, num=limit + 1)
        keys = [_split_member(_text(m)) for m in members[:limit]]
        return Page(keys, recalled_cursor(keys[-1]) if len(members) > limit else None)

    async def leased(self, limit: int = 1000) -> list[TaskRecord]:
        """Tasks ``running`` under a lease, oldest first.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        records = await self._indexed_tasks(self._leased_key, limit, "leased")
        return [t for t in records if t.status is TaskStatus.RUNNING and t.lease_s is not None]

    async def escalated(self, limit: int = 100) -> list[TaskRecord]:
        """Tasks escalated to an operator, oldest first.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        records = await self._indexed_tasks(self._escalated_key, limit, "escalated")
        return [t for t in records if t.status is TaskStatus.ESCALATED]

    async def unnotified(self, limit: int = 1000) -> list[WorkflowRecord]:
        """Finished workflows whose ``completed`` document was not yet published, oldest first.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        records = await self._workflows_in(
            self._unnotified_key, limit, newest_first=False, operation="unnotified"
        )
        return [w for w in records if w.status.terminal and not w.notified]

    async def list_workflows(
        self, *, status: WorkflowStatus | None = None, limit: int = 100
    ) -> list[WorkflowRecord]:
        """Workflows, newest first, optionally only those with ``status``.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        if status is None:
            return await self._workflows_in(
                self._index_key, limit, newest_first=True, operation="list_workflows"
            )
        status = WorkflowStatus(status)
        records = await self._workflows_in(
            self._status_key(status), limit, newest_first=True, operation="list_workflows"
        )
        return [w for w in records if w.status is status]

    async def _workflows_in(
        self, index: str, limit: int, *, newest_first: bool, operation: str
    ) -> list[WorkflowRecord]:
        """The workflows whose ids are the first ``limit`` members of the sorted set ``index``."""
        client = self._conn()
        if limit <= 0:
            return []
        with self._translate(operation):
            ids = await client.zrange(index, 0, limit - 1, desc=newest_first)
            keys = [self._wf_key(_text(i)) for i in ids]
            blobs: list[object] = list(await client.mget(keys)) if keys else []
        return [WorkflowRecord.from_dict(_decode(b)) for b in blobs if b is not None]

    async def query_workflows(
        self, query: WorkflowQuery = WorkflowQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowRecord]:
        """Workflows matching ``query``, newest first, one page (see the StateStore contract).

        Read from the narrowest sorted set (the capability's, else the status's, else all workflows) by
        score range; only when both status and capability are given are entries filtered beyond it.

        Raises:
            ValueError: bad ``cursor`` or ``limit``.
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        check_limit(limit)
        after = decode_cursor(cursor, 1) if cursor else None
        if query.capability is not None:
            index = self._capability_key(query.capability)
        elif query.status is not None:
            index = self._status_key(WorkflowStatus(query.status))
        else:
            index = self._index_key
        client = self._conn()

        async def load(members: list[str]) -> list[WorkflowRecord | None]:
            blobs = await client.mget([self._wf_key(m) for m in members])
            return [None if b is None else WorkflowRecord.from_dict(_decode(b)) for b in blobs]

        def keep(w: WorkflowRecord) -> bool:
            return (query.status is None or w.status is query.status) and (
                query.capability is None or query.capability in w.capabilities
            )

        found, next_position = await self._scan(
            index, load, keep, (query.since, query.until), after, limit, parts=1, operation="query_workflows"
        )
        next_cursor = encode_cursor(next_position[0], *next_position[1]) if next_position else None
        return Page(found, next_cursor)

    async def query_dead(
        self, query: DeadQuery = DeadQuery(), *, limit: int = 50, cursor: str | None = None
    ) -> Page[TaskRecord]:
        """Dead tasks, most recently parked first, one page (see the StateStore contract).

        Raises:
            ValueError: bad ``cursor`` or ``limit``.
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        check_limit(limit)
        after = decode_cursor(cursor, 2) if cursor else None
        index = self._dead_key if query.capability is None else self._dead_capability_key(query.capability)
        client = self._conn()

        async def load(members: list[str]) -> list[TaskRecord | None]:
            pipe = client.pipeline(transaction=False)
            for member in members:
                workflow_id, _, task_id = member.partition(_MEMBER_SEP)
                pipe.hget(self._tasks_key(workflow_id), task_id)
            blobs = await pipe.execute()
            return [None if b is None else TaskRecord.from_dict(_decode(b)) for b in blobs]

        def keep(t: TaskRecord) -> bool:
            # The index is written with the documents: this only filters a race with a concurrent save.
            return t.status is TaskStatus.DEAD

        found, next_position = await self._scan(
            index, load, keep, (query.since, query.until), after, limit, parts=2, operation="query_dead"
        )
        next_cursor = encode_cursor(next_position[0], *next_position[1]) if next_position else None
        return Page(found, next_cursor)

    async def _scan(
        self,
        index: str,
        load: Callable[[list[str]], Awaitable[list[_R | None]]],
        keep: Callable[[_R], bool],
        span: tuple[float | None, float | None],
        after: _Position | None,
        limit: int,
        *,
        parts: int,
        operation: str,
    ) -> tuple[list[_R], _Position | None]:
        """One page of the records indexed in the sorted set ``index``, newest first.

        Members with equal scores come in reverse lexicographic order, which is the order of their id
        parts (the separator sorts below every id character), so ``(score, ids)`` descending is the
        order of the index. Returns the records and the position the next page starts after (None
        when the index has no more).
        """
        client = self._conn()
        since, until = span
        top: str | float = f"({until!r}" if until is not None else "+inf"
        if after is not None and (until is None or after[0] < until):
            top = after[0]  # inclusive: the entries tied with the cursor's time are skipped below
        bottom: str | float = since if since is not None else "-inf"
        found: list[_R] = []
        last: _Position | None = None
        offset = 0
        chunk = min(max(limit + 1, 64), _CHUNK)
        with self._translate(operation):
            while offset < _MAX_SCAN:
                entries: list[Any] = await client.zrange(
                    index, top, bottom, desc=True, byscore=True, offset=offset, num=chunk, withscores=True
                )
                offset += len(entries)
                positions: list[_Position] = []
                members: list[str] = []
                for raw, score in entries:
                    member = _text(raw)
                    key: tuple[str, ...] = tuple(member.split(_MEMBER_SEP, parts - 1))
                    position = (float(score), key)
                    if after is not None and position >= after:
                        continue
                    positions.append(position)
                    members.append(member)
                records = await load(members) if members else []
                for position, record in zip(positions, records, strict=True):
                    if record is None or not keep(record):
                        last = position
                        continue
                    if len(found) == limit:
                        return found, last  # one more exists: the next page starts after the last kept
                    found.append(record)
                    last = position
                if len(entries) < chunk:
                    return found, None
        # Read as much as one call may: hand back what was found, and where to go on.
        return found, last

    async def known_capabilities(self) -> list[str]:
        """Every capability of stored workflows (the keys of their capability index) and of agents seen.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored agent document is corrupt.
        """
        client = self._conn()
        index = self._capability_key("")
        found: set[str] = set()
        with self._translate("known_capabilities"):
            async for key in client.scan_iter(match=_glob_escape(index) + "*", count=_CHUNK):
                found.add(_text(key)[len(index) :])
        found.update(c for agent in await self.list_agents() for c in agent.capabilities)
        return sorted(found)

    async def list_agents(self) -> list[AgentRecord]:
        """Every agent seen, by id.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        client = self._conn()
        with self._translate("list_agents"):
            agents = await client.hgetall(self._agents_key)
        by_id = sorted((_text(agent_id), doc) for agent_id, doc in agents.items())
        return [AgentRecord.from_dict(_decode(doc)) for _, doc in by_id]

    async def prune_agents(self, agent_ids: Iterable[str], *, seen_before: float) -> list[str]:
        """Remove the records of ``agent_ids`` last seen before ``seen_before``. Each is removed only
        if its document is still the one read (compared in a Lua script), so a heartbeat stored in
        between keeps its agent.

        Raises:
            NotConnectedError: the store is not open.
            StoreError: Redis failed or a stored document is corrupt.
        """
        client = self._conn()
        ids = list(dict.fromkeys(agent_ids))
        if not ids:
            return []
        with self._translate("prune_agents"):
            docs = await client.hmget(self._agents_key, ids)
        stale: list[tuple[str, EncodableT]] = []
        for agent_id, doc in zip(ids, docs, strict=True):
            if doc is not None and AgentRecord.from_dict(_decode(doc)).last_seen < seen_before:
                stale.append((agent_id, doc))
        if not stale:
            return []
        args: list[EncodableT] = [v for pair in stale for v in pair]
        with self._translate("prune_agents"):
            removed = await client.eval(_PRUNE_AGENTS, 1, self._agents_key, *args)
        return [_text(agent_id) for agent_id in removed]


#: Compare-and-delete agent records: ARGV holds (agent id, document) pairs; a field is deleted only
#: while it still holds that document. Returns the ids deleted.
_PRUNE_AGENTS = """
local removed = {}
for i = 1, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
        redis.call('HDEL', KEYS[1], ARGV[i])
        removed[#removed + 1] = ARGV[i]
    end
end
return removed
"""


def _decode(blob: object) -> dict[str, Any]:
    """The mapping stored as msgpack in ``blob`` (a reply of Redis)."""
    if not isinstance(blob, bytes):
        raise StoreError(f"corrupt record in Redis store: expected bytes, got {type(blob).__name__}")
    try:
        value = codec.decode(blob)
    except ProtocolError as exc:
        raise StoreError(f"corrupt record in Redis store: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError("corrupt record in Redis store: not a mapping")
    return value


def _split_member(member: str) -> tuple[str, str]:
    workflow_id, _, task_id = member.partition(_MEMBER_SEP)
    return workflow_id, task_id


def _text(value: object) -> str:
    """A key or member name from a Redis reply (bytes, as the client does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # IPv6 literal
        port = f":{parts.port}" if parts.port is not None else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        # An unparsable URL may still hold a secret: show only its scheme.
        return url.split(":", 1)[0] + "://***"


def _glob_escape(text: str) -> str:
    """Escape the characters Redis SCAN MATCH treats as glob syntax."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
