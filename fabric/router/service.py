"""The router: admits workflows, releases ready tasks, records every state change, answers queries.

Order of durability (what makes "nothing lost, nothing completed twice" hold across a ``kill -9``):

* A submission is acked only after its workflow is stored and its ready tasks are confirmed by the
  broker. Tasks are stored as ``queued`` with ``dispatched=False`` first; after the broker confirms
  their publish they are saved ``dispatched=True``. At start the router publishes every task still
  ``queued`` and undispatched, so a crash between the two writes only duplicates a message, which
  workers tolerate (execution is at-least-once) and the router absorbs (one terminal state per task).
* An event is acked only after the state change it causes is committed in one atomic batch, with the
  dependents it releases marked ``queued`` in the same batch.
* A finished workflow is committed with ``notified=False``; after its ``completed`` document is
  published it is saved ``notified=True``; at start any finished, unnotified workflow is announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Self

from pydantic import ValidationError

from fabric.errors import (
    NotConnectedError,
    ProtocolError,
    PublishError,
    StoreError,
    TransportError,
)
from fabric.health import HealthServer, render_counters, serve_health
from fabric.protocol import codec, headers
from fabric.protocol.messages import (
    Accepted,
    Completed,
    ErrorInfo,
    EventStatus,
    Heartbeat,
    Rejected,
    RejectReason,
    TaskEvent,
    TaskOutcome,
    TaskStatus,
    WorkflowStatus,
)
from fabric.router.admission import Admitted, Refusal, admit
from fabric.settings import FabricSettings
from fabric.store import StateStore, open_store
from fabric.store.base import AgentRecord, TaskRecord, WorkflowRecord
from fabric.topology import names, spec
from fabric.transport.amqp import DEFAULT_EXCHANGE, AmqpConnection, Consumer, Delivery

log = logging.getLogger("fabric.router")

#: Pause before a message whose processing failed on a store or broker error is requeued, so an
#: outage does not turn into a hot redelivery loop.
_REQUEUE_PAUSE_S = 1.0

_FAILED_STATES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.UPSTREAM_FAILED})


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (bounded memory)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> Any:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Router:
    """The router process's composition root. Use as ``async with Router(settings) as router:``.

    Example:
        >>> async with Router(load_settings()) as router:
        ...     await router.wait_closed()
    """

    def __init__(
        self,
        settings: FabricSettings,
        *,
        store: StateStore | None = None,
        amqp: AmqpConnection | None = None,
    ) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self._store = store or open_store(
            settings.store.url,
            namespace=settings.namespace,
            sqlite_synchronous=settings.store.sqlite_synchronous,
        )
        self._owns_store = store is None
        self._amqp = amqp or AmqpConnection(
            settings.amqp_url.get_secret_value(),
            name=f"fabric-router:{settings.namespace}",
            publish_timeout_s=settings.router.publish_timeout_s,
        )
        self._consumers: list[Consumer] = []
        self._health: HealthServer | None = None
        self._locks = _KeyedLocks()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = asyncio.Event()
        #: Counters of what this router did since start (exposed through RPC ``ping``).
        self.stats: dict[str, int] = {
            "submissions": 0,
            "accepted": 0,
            "rejected": 0,
            "events": 0,
            "dispatched": 0,
            "completed": 0,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise NotConnectedError("a Router cannot be started twice; create a new one")
        self._started = True
        if self._owns_store:
            await self._store.__aenter__()
        try:
            await self._amqp.connect()
            await self._amqp.declare(spec.core(self.ns))
            await self._recover()
            prefetch = self.settings.router
            self._consumers = [
                await self._amqp.consume(
                    names.submit_queue(self.ns), self._on_submission, prefetch=prefetch.submit_prefetch
                ),
                await self._amqp.consume(
                    names.events_queue(self.ns), self._on_event, prefetch=prefetch.events_prefetch
                ),
                await self._amqp.consume(names.rpc_queue(self.ns), self._on_rpc, prefetch=32),
                await self._amqp.consume(names.heartbeats_queue(self.ns), self._on_heartbeat, prefetch=64),
            ]
            http = self.settings.http
            self._health = await serve_health(
                http.host,
                http.port,
                checks={
                    "broker": self._check_broker,
                    "consumers": self._check_consumers,
                    "store": self._check_store,
                },
                metrics=self._metrics,
                fallback=False,
            )
        except BaseException:
            await self._shutdown()
            raise
        log.info("router ready (namespace %s, store %s)", self.ns, self.settings.store.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._health is not None:
            await self._health.__aexit__(None, None, None)
        for consumer in self._consumers:
            await consumer.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=10)
        await self._amqp.close()
        if self._owns_store:
            await self._store.__aexit__(None, None, None)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def store(self) -> StateStore:
        return self._store

    @property
    def http_port(self) -> int | None:
        """The port of the health endpoints (useful when configured as 0)."""
        return self._health.port if self._health else None

    async def _check_broker(self) -> str | None:
        return None if self._amqp.connected else "broker connection is down"

    async def _check_consumers(self) -> str | None:
        idle = [c.queue_name for c in self._consumers if not c.healthy]
        return f"not consuming {', '.join(idle)}" if idle else None

    async def _check_store(self) -> str | None:
        await self._store.ping()
        return None

    def _metrics(self) -> str:
        values: dict[str, float] = {f"{k}_total": v for k, v in self.stats.items()}
        return render_counters("fabric_router", values, {"namespace": self.ns})

    # -- recovery ---------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Publish tasks stored as ready but never confirmed; announce finished, unannounced workflows."""
        republished = 0
        while True:
            batch = await self._store.undispatched(limit=500)
            if not batch:
                break
            by_workflow: dict[str, list[TaskRecord]] = {}
            for task in batch:
                by_workflow.setdefault(task.workflow_id, []).append(task)
            for tasks in by_workflow.values():
                await self._dispatch(tasks)
            republished += len(batch)
        announced = 0
        for workflow in await self._store.unnotified():
            await self._announce(workflow)
            announced += 1
        if republished or announced:
            log.info(
                "recovery: published %d pending tasks, announced %d finished workflows",
                republished,
                announced,
            )

    # -- submissions ------------------------------------------------------------------------------

    async def _on_submission(self, delivery: Delivery) -> None:
        self.stats["submissions"] += 1
        await self._guarded(delivery, self._submission(delivery))

    async def _submission(self, delivery: Delivery) -> None:
        reply_type = codec.normalize_content_type(delivery.content_type) or codec.JSON
        router = self.settings.router
        try:
            admitted = admit(
                delivery.body,
                delivery.content_type,
                message_id=delivery.message_id,
                reply_to=delivery.reply_to,
                correlation_id=delivery.correlation_id,
                max_body_bytes=router.max_body_bytes,
                max_tasks=router.max_tasks,
                default_max_attempts=router.default_max_attempts,
            )
        except Refusal as refusal:
            await self._refuse(delivery, reply_type, refusal)
            return
        await self._accept(delivery, admitted)

    async def _refuse(self, delivery: Delivery, reply_type: str, refusal: Refusal) -> None:
        self.stats["rejected"] += 1
        log.info("rejected submission %s: %s: %s", delivery.message_id, refusal.reason, refusal.detail)
        reply = Rejected(
            workflow_id=refusal.workflow_id,
            reason=refusal.reason,
            detail=refusal.detail,
            errors=list(refusal.errors),
        )
        try:
            await self._reply(
                delivery.reply_to, delivery.correlation_id, reply.model_dump(mode="json"), reply_type
            )
        except TransportError as exc:
            await self._requeue_later(delivery, exc)
            return
        await delivery.ack()

    async def _accept(self, delivery: Delivery, admitted: Admitted) -> None:
        workflow = admitted.workflow
        async with self._locks.hold(workflow.workflow_id):
            existing = await self._store.insert_workflow(workflow, admitted.tasks)
            if existing is not None:
                await self._resubmitted(delivery, workflow, existing)
                return
            await self._dispatch(admitted.ready)
            self.stats["accepted"] += 1
            accepted = Accepted(workflow_id=workflow.workflow_id, tasks=workflow.task_count)
            await self._reply(
                workflow.reply_to,
                workflow.correlation_id,
                accepted.model_dump(mode="json"),
                workflow.content_type,
            )
        await delivery.ack()

    async def _resubmitted(self, delivery: Delivery, new: WorkflowRecord, existing: WorkflowRecord) -> None:
        """The workflow id is taken: the same body gets the same answer, another body a conflict."""
        if existing.fingerprint != new.fingerprint:
            await self._refuse(
                delivery,
                new.content_type,
                Refusal(
                    RejectReason.CONFLICT,
                    f"workflow {existing.workflow_id!r} already exists with a different body",
                    existing.workflow_id,
                ),
            )
            return
        # A resend: perhaps the router died after storing it but before dispatching everything.
        pending = [
            t
            for t in (await self._store.get_tasks(existing.workflow_id)).values()
            if t.status is TaskStatus.QUEUED and not t.dispatched
        ]
        await self._dispatch(pending)
        accepted = Accepted(workflow_id=existing.workflow_id, tasks=existing.task_count)
        await self._reply(
            delivery.reply_to, delivery.correlation_id, accepted.model_dump(mode="json"), new.content_type
        )
        if existing.status.terminal:
            document = await self._completion_document(existing)
            await self._reply(delivery.reply_to, delivery.correlation_id, document, new.content_type)
        await delivery.ack()

    # -- dispatch ---------------------------------------------------------------------------------

    async def _dispatch(self, tasks: Iterable[TaskRecord]) -> None:
        """Publish ready tasks (confirmed, pipelined), then record them as dispatched in one batch."""
        tasks = list(tasks)
        if not tasks:
            return
        workflow_id = tasks[0].workflow_id
        upstream_ids = {dep for t in tasks for dep in t.depends_on}
        upstream = await self._store.get_tasks(workflow_id, upstream_ids) if upstream_ids else {}
        outcomes = await asyncio.gather(
            *(
                self._publish_task(t, {d: upstream[d].result for d in t.depends_on if d in upstream})
                for t in tasks
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for task, outcome in zip(tasks, outcomes, strict=True):
            if outcome is None:
                task.dispatched = True
        await self._store.save(tasks=[t for t in tasks if t.dispatched])
        self.stats["dispatched"] += sum(1 for t in tasks if t.dispatched)
        if failures:
            # Not acked: the broker redelivers the message that caused this, or recovery retries it.
            raise failures[0]

    async def _publish_task(self, task: TaskRecord, upstream: dict[str, Any]) -> None:
        await self._amqp.declare(spec.capability(self.ns, task.capability))
        attempt = task.attempts + 1
        task_headers: dict[str, Any] = {
            headers.WORKFLOW_ID: task.workflow_id,
            headers.TASK_ID: task.task_id,
            headers.ATTEMPT: attempt,
            headers.MAX_ATTEMPTS: task.max_attempts,
            headers.AVOID: [],
        }
        if task.timeout_s is not None:
            task_headers[headers.TIMEOUT_S] = task.timeout_s
        body = codec.encode({"input": task.input, "upstream": upstream})
        kwargs: dict[str, Any] = {
            "headers": task_headers,
            "message_id": f"{task.workflow_id}/{task.task_id}/{attempt}",
            "priority": task.priority,
        }
        try:
            await self._amqp.publish(names.tasks_exchange(self.ns), task.capability, body, **kwargs)
        except PublishError as exc:
            if "unroutable" not in str(exc):
                raise
            # Someone deleted the capability queue since we declared it: declare it again and retry once.
            log.warning(
                "task %s/%s was unroutable; declaring %s again",
                task.workflow_id,
                task.task_id,
                task.capability,
            )
            await self._amqp.forget(spec.capability(self.ns, task.capability))
            await self._amqp.declare(spec.capability(self.ns, task.capability))
            await self._amqp.publish(names.tasks_exchange(self.ns), task.capability, body, **kwargs)

    # -- events -----------------------------------------------------------------------------------

    async def _on_event(self, delivery: Delivery) -> None:
        self.stats["events"] += 1
        await self._guarded(delivery, self._event(delivery))

    async def _event(self, delivery: Delivery) -> None:
        try:
            event = TaskEvent.model_validate(
                codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
            )
        except (ProtocolError, ValidationError) as exc:
            await self._park(delivery, "malformed_event", str(exc))
            return
        await self._record_event(delivery, event)

    async def _record_event(self, delivery: Delivery, event: TaskEvent) -> None:
        async with self._locks.hold(event.workflow_id):
            found = await self._store.get_tasks(event.workflow_id, [event.task_id])
            task = found.get(event.task_id)
            if task is None:
                log.warning("event for unknown task %s/%s ignored", event.workflow_id, event.task_id)
            elif task.status.terminal:
                log.debug(
                    "late %s event for finished task %s/%s", event.status, task.workflow_id, task.task_id
                )
            elif event.status is EventStatus.STARTED:
                await self._record_start(task, event)
            elif event.status is EventStatus.SUCCEEDED:
                await self._finished(task, event, TaskStatus.SUCCEEDED)
            elif event.status in (EventStatus.FAILED, EventStatus.DEAD):
                await self._finished(
                    task, event, TaskStatus.FAILED if event.status is EventStatus.FAILED else TaskStatus.DEAD
                )
            elif event.status is EventStatus.CANCELLED:
                await self._finished(task, event, TaskStatus.CANCELLED)
            elif event.status in (EventStatus.RETRYING, EventStatus.REASSIGNED):
                await self._transition(task, event, TaskStatus.RETRYING)
            elif event.status is EventStatus.ESCALATED:
                await self._transition(task, event, TaskStatus.ESCALATED)
        await delivery.ack()

    async def _record_start(self, task: TaskRecord, event: TaskEvent) -> None:
        if event.attempt < task.attempts:
            return  # a stale start from an earlier attempt
        task.started_at = event.at
        await self._transition(task, event, TaskStatus.RUNNING)

    async def _transition(self, task: TaskRecord, event: TaskEvent, status: TaskStatus) -> None:
        task.status = status
        task.attempts = max(task.attempts, event.attempt)
        task.agent = event.agent_id
        if event.error is not None:
            task.error = event.error.model_dump()
        await self._store.save(tasks=[task])
        await self._notify_task(task)

    async def _finished(self, task: TaskRecord, event: TaskEvent, status: TaskStatus) -> None:
        """Record the one terminal state of ``task``, release or fail its dependents,
        and finish the workflow when nothing remains."""
        workflow = await self._store.get_workflow(task.workflow_id)
        if workflow is None:
            log.error("task %s/%s has no workflow record; event ignored", task.workflow_id, task.task_id)
            return
        now = time.time()
        task.status = status
        task.attempts = max(task.attempts, event.attempt)
        task.agent = event.agent_id
        task.finished_at = event.at
        task.result = event.result if status is TaskStatus.SUCCEEDED else None
        task.error = event.error.model_dump() if event.error is not None else None
        changed = [task]
        released: list[TaskRecord] = []
        if status is TaskStatus.SUCCEEDED:
            dependents = await self._store.get_tasks(task.workflow_id, task.dependents)
            for dependent in dependents.values():
                dependent.pending_deps -= 1
                if dependent.pending_deps <= 0 and dependent.status is TaskStatus.WAITING:
                    dependent.status = TaskStatus.QUEUED
                    dependent.queued_at = now
                    dependent.dispatched = False
                    released.append(dependent)
                changed.append(dependent)
        else:
            cascade_status = (
                TaskStatus.CANCELLED if status is TaskStatus.CANCELLED else TaskStatus.UPSTREAM_FAILED
            )
            changed += await self._cascade(task, cascade_status, now)
        workflow.remaining -= sum(1 for t in changed if t.status.terminal)
        if workflow.remaining <= 0:
            workflow.remaining = 0
            workflow.finished_at = now
            workflow.status = await self._final_status(workflow, changed)
        await self._store.save(workflows=[workflow], tasks=changed)
        await self._dispatch(released)
        await asyncio.gather(*(self._notify_task(t) for t in changed if t.status.terminal or t in released))
        if workflow.status.terminal:
            await self._announce(workflow)

    async def _cascade(self, failed: TaskRecord, status: TaskStatus, now: float) -> list[TaskRecord]:
        """Every task downstream of ``failed`` that has not finished ends with ``status`` (never runs)."""
        changed: list[TaskRecord] = []
        seen = {failed.task_id}
        frontier = deque([failed.dependents])
        while frontier:
            ids = [i for i in frontier.popleft() if i not in seen]
            seen.update(ids)
            if not ids:
                continue
            for dependent in (await self._store.get_tasks(failed.workflow_id, ids)).values():
                if not dependent.status.terminal:
                    dependent.status = status
                    dependent.finished_at = now
                    dependent.error = {
                        "type": "UpstreamFailed",
                        "message": f"dependency {failed.task_id!r} ended {failed.status}",
                    }
                    changed.append(dependent)
                frontier.append(dependent.dependents)
        return changed

    async def _final_status(self, workflow: WorkflowRecord, changed: list[TaskRecord]) -> WorkflowStatus:
        tasks = await self._store.get_tasks(workflow.workflow_id)
        tasks.update({t.task_id: t for t in changed})
        statuses = {t.status for t in tasks.values()}
        if statuses & _FAILED_STATES:
            return WorkflowStatus.FAILED
        if TaskStatus.CANCELLED in statuses:
            return WorkflowStatus.CANCELLED
        return WorkflowStatus.SUCCEEDED

    # -- announcements ----------------------------------------------------------------------------

    async def _completion_document(self, workflow: WorkflowRecord) -> dict[str, Any]:
        tasks = await self._store.get_tasks(workflow.workflow_id)
        document = Completed(
            workflow_id=workflow.workflow_id,
            status=workflow.status,
            tasks={
                t.task_id: TaskOutcome(
                    status=t.status,
                    result=t.result,
                    error=ErrorInfo(**t.error) if t.error else None,
                    attempts=t.attempts,
                    agent=t.agent,
                )
                for t in tasks.values()
            },
        )
        return document.model_dump(mode="python")

    async def _announce(self, workflow: WorkflowRecord) -> None:
        """Send the ``completed`` document to the submitter and to ``{ns}.notify``, then remember that."""
        document = await self._completion_document(workflow)
        body = codec.encode(document, workflow.content_type)
        await asyncio.gather(
            self._reply_raw(workflow.reply_to, workflow.correlation_id, body, workflow.content_type),
            self._amqp.publish(
                names.notify_exchange(self.ns),
                names.workflow_notify_key(workflow.workflow_id, str(workflow.status)),
                body,
                content_type=workflow.content_type,
                mandatory=False,
            ),
        )
        workflow.notified = True
        await self._store.save(workflows=[workflow])
        self.stats["completed"] += 1
        log.info("workflow %s %s", workflow.workflow_id, workflow.status)

    async def _notify_task(self, task: TaskRecord) -> None:
        note = {
            "workflow_id": task.workflow_id,
            "task_id": task.task_id,
            "status": str(task.status),
            "attempts": task.attempts,
            "agent": task.agent,
            "error": task.error,
        }
        await self._amqp.publish(
            names.notify_exchange(self.ns),
            names.task_notify_key(task.workflow_id, task.task_id, str(task.status)),
            codec.encode(note),
            mandatory=False,
            persistent=False,
        )

    async def _reply(
        self, reply_to: str | None, correlation_id: str | None, doc: dict[str, Any], content_type: str
    ) -> None:
        if reply_to:
            await self._reply_raw(reply_to, correlation_id, codec.encode(doc, content_type), content_type)

    async def _reply_raw(
        self, reply_to: str | None, correlation_id: str | None, body: bytes, content_type: str
    ) -> None:
        if not reply_to:
            return
        # mandatory=False: a client that went away must not make the router fail; it can ask again.
        await self._amqp.publish(
            DEFAULT_EXCHANGE,
            reply_to,
            body,
            content_type=content_type,
            correlation_id=correlation_id,
            mandatory=False,
            persistent=False,
        )

    # -- queries ----------------------------------------------------------------------------------

    async def _on_rpc(self, delivery: Delivery) -> None:
        method = delivery.routing_key
        try:
            request = (
                codec.decode(delivery.body, delivery.content_type or codec.MSGPACK) if delivery.body else {}
            )
            if not isinstance(request, dict):
                raise ProtocolError("request must be a map")
            response: dict[str, Any] = {"ok": True, "data": await self._query(method, request)}
        except (ProtocolError, KeyError, ValueError) as exc:
            response = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
        except StoreError as exc:
            response = {"ok": False, "error": {"type": "StoreError", "message": str(exc)}}
        try:
            await self._reply(delivery.reply_to, delivery.correlation_id, response, codec.MSGPACK)
        except TransportError as exc:
            log.warning("could not answer %s query: %s", method, exc)
        await delivery.ack()

    async def _query(self, method: str, request: dict[str, Any]) -> Any:
        if method == "ping":
            return {"namespace": self.ns, "stats": dict(self.stats)}
        if method == "agents":
            return [a.to_dict() for a in await self._store.list_agents()]
        workflow_id = str(request["workflow_id"])
        workflow = await self._store.get_workflow(workflow_id)
        if workflow is None:
            return None
        if method == "status":
            return await self.status_document(workflow)
        if method == "result":
            if not workflow.status.terminal:
                return {"kind": "running", "workflow_id": workflow_id, "status": str(workflow.status)}
            return await self._completion_document(workflow)
        raise KeyError(f"unknown query {method!r}")

    async def status_document(self, workflow: WorkflowRecord) -> dict[str, Any]:
        tasks = await self._store.get_tasks(workflow.workflow_id)
        counts: dict[str, int] = {}
        for t in tasks.values():
            counts[str(t.status)] = counts.get(str(t.status), 0) + 1
        return {
            "workflow_id": workflow.workflow_id,
            "status": str(workflow.status),
            "created_at": workflow.created_at,
            "finished_at": workflow.finished_at,
            "metadata": workflow.metadata,
            "counts": counts,
            "tasks": {
                t.task_id: {
                    "status": str(t.status),
                    "capability": t.capability,
                    "depends_on": t.depends_on,
                    "attempts": t.attempts,
                    "agent": t.agent,
                    "error": t.error,
                    "queued_at": t.queued_at,
                    "started_at": t.started_at,
                    "finished_at": t.finished_at,
                }
                for t in tasks.values()
            },
        }

    # -- heartbeats -------------------------------------------------------------------------------

    async def _on_heartbeat(self, delivery: Delivery) -> None:
        try:
            beat = Heartbeat.model_validate(
                codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
            )
        except (ProtocolError, ValidationError) as exc:
            log.warning("malformed heartbeat dropped: %s", exc)
            await delivery.ack()
            return
        record = AgentRecord(
            agent_id=beat.agent_id,
            agent=beat.agent,
            host=beat.host,
            pid=beat.pid,
            capabilities=beat.capabilities,
            concurrency=beat.concurrency,
            in_flight=beat.in_flight,
            processed=beat.processed,
            failed=beat.failed,
            health=beat.health,
            breakers=beat.breakers,
            last_seen=beat.at,
        )
        with contextlib.suppress(StoreError):
            known = {a.agent_id: a for a in await self._store.list_agents()}
            if beat.agent_id in known:
                record.first_seen = known[beat.agent_id].first_seen
            await self._store.put_agent(record)
        await delivery.ack()

    # -- failure handling of the router itself ----------------------------------------------------

    async def _guarded(self, delivery: Delivery, work: Any) -> None:
        """Run ``work``; on a store or broker failure requeue the message after a pause, on a bug park it."""
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await work
        except (StoreError, TransportError) as exc:
            await self._requeue_later(delivery, exc)
        except Exception as exc:
            log.critical("router failed on message %s; parking it", delivery.message_id, exc_info=True)
            await self._park(delivery, "router_error", f"{type(exc).__name__}: {exc}")
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _requeue_later(self, delivery: Delivery, exc: BaseException) -> None:
        log.warning("could not process message %s (%s); requeueing it", delivery.message_id, exc)
        await asyncio.sleep(_REQUEUE_PAUSE_S)
        await delivery.nack(requeue=True)

    async def _park(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Move a message the router cannot process to ``{ns}.dead`` with the reason, then ack it."""
        parked_headers = dict(delivery.headers)
        parked_headers[headers.DEAD_REASON] = reason
        parked_headers[headers.LAST_ERROR] = detail[:1000]
        parked_headers["fabric-original-routing-key"] = delivery.routing_key
        try:
            await self._amqp.publish(
                names.dead_exchange(self.ns),
                delivery.routing_key,
                delivery.body,
                headers=parked_headers,
                content_type=delivery.content_type or "application/octet-stream",
                message_id=delivery.message_id,
            )
        except TransportError as exc:
            await self._requeue_later(delivery, exc)
            return
        log.error(
            "parked message %s on %s: %s: %s", delivery.message_id, names.dead_queue(self.ns), reason, detail
        )
        await delivery.ack()
