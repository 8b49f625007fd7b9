"""The worker runtime: consume capability queues, run handlers, report events, heartbeat, drain.

For every task message: publish ``started``; run the handler under the concurrency limit and the
attempt's time limit; publish the outcome event and wait for the broker's confirm; only then ack the
task message (DESIGN.md §6). If the process dies anywhere before the ack, the broker redelivers the task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Self

from fabric.errors import HandlerSignal, NotConnectedError, ProtocolError, TransportError
from fabric.health import HealthServer, render_counters, serve_health
from fabric.policy import Action, FailFast, Failure, FailurePolicy
from fabric.protocol import codec, headers
from fabric.protocol.messages import ErrorInfo, EventStatus, Heartbeat, TaskEvent
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Consumer, Delivery
from fabric.worker.agent import Agent, Handler, Task

log = logging.getLogger("fabric.worker")


class Worker:
    """Runs one :class:`Agent` against the broker. Use as ``async with Worker(agent, settings):``.

    Example:
        >>> async with Worker(agent, load_settings()) as worker:
        ...     await worker.wait_stopped()
    """

    def __init__(
        self,
        agent: Agent,
        settings: FabricSettings,
        *,
        policy: FailurePolicy | None = None,
        concurrency: int | None = None,
    ) -> None:
        if not agent.handlers:
            raise ValueError(f"agent {agent.name!r} has no handlers: register some with @agent.handler(...)")
        self.agent = agent
        self.settings = settings
        self.ns = settings.namespace
        self.concurrency = concurrency or settings.worker.concurrency
        self.agent_id = settings.worker.agent_id or f"{agent.name}@{socket.gethostname()}:{os.getpid()}"
        self._policy = policy or FailFast()
        self._amqp = AmqpConnection(
            settings.amqp_url.get_secret_value(), name=f"fabric-worker:{self.agent_id}"
        )
        self._slots = asyncio.Semaphore(self.concurrency)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix=f"fabric-{agent.name}"
        )
        self._consumers: list[Consumer] = []
        self._running: set[asyncio.Task[Any]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._health: HealthServer | None = None
        self._draining = False
        self._started = False
        self._stopped = asyncio.Event()
        self.processed = 0
        self.failed = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise NotConnectedError("a Worker cannot be started twice; create a new one")
        self._started = True
        try:
            await self._amqp.connect()
            await self._amqp.declare(spec.build(self.ns, self.agent.capabilities))
            for capability in self.agent.capabilities:
                consumer = await self._amqp.consume(
                    names.capability_queue(self.ns, capability),
                    functools.partial(self._on_task, self.agent.handlers[capability]),
                    prefetch=self.concurrency,
                )
                self._consumers.append(consumer)
            http = self.settings.http
            # Many workers may share a host: a taken port falls back to a free one (logged).
            self._health = await serve_health(
                http.host,
                http.port,
                checks={"broker": self._check_broker, "consumers": self._check_consumers},
                metrics=self._metrics,
                fallback=True,
            )
        except BaseException:
            await self._close()
            raise
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="fabric-heartbeats")
        log.info(
            "worker %s ready: capabilities %s, concurrency %d",
            self.agent_id,
            self.agent.capabilities,
            self.concurrency,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking tasks, let running ones finish (up to the drain timeout), then close.

        Tasks still running at the deadline are left unacked, so the broker gives them to another worker.
        """
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        for consumer in self._consumers:
            await consumer.cancel()
        timeout = self.settings.worker.drain_timeout_s if timeout_s is None else timeout_s
        if self._running:
            log.info("draining: waiting up to %.0fs for %d running tasks", timeout, len(self._running))
            _, pending = await asyncio.wait(self._running, timeout=timeout)
            if pending:
                log.warning(
                    "drain deadline passed with %d tasks running; the broker will redeliver them",
                    len(pending),
                )
                for task in pending:
                    task.cancel()
        await self._close()

    async def _close(self) -> None:
        if self._health is not None:
            await self._health.__aexit__(None, None, None)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeat_task
        await self._amqp.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def http_port(self) -> int | None:
        return self._health.port if self._health else None

    async def _check_broker(self) -> str | None:
        return None if self._amqp.connected else "broker connection is down"

    async def _check_consumers(self) -> str | None:
        if self._draining:
            return "draining"
        idle = [c.queue_name for c in self._consumers if not c.healthy]
        return f"not consuming {', '.join(idle)}" if idle else None

    def _metrics(self) -> str:
        values: dict[str, float] = {
            "tasks_processed_total": self.processed,
            "tasks_failed_total": self.failed,
            "tasks_in_flight": self.in_flight,
            "concurrency": self.concurrency,
        }
        return render_counters("fabric_worker", values, {"agent_id": self.agent_id})

    # -- tasks ------------------------------------------------------------------------------------

    async def _on_task(self, handler: Handler, delivery: Delivery) -> None:
        current = asyncio.current_task()
        assert current is not None
        self._running.add(current)
        try:
            await self._process(handler, delivery)
        except Exception as exc:
            # A bug in the runtime, not in the handler: park the message rather than loop on it.
            log.critical("worker failed on task message %s; parking it", delivery.message_id, exc_info=True)
            if not delivery.settled:
                await self._park(delivery, "worker_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._running.discard(current)

    async def _process(self, handler: Handler, delivery: Delivery) -> None:
        msg_headers = delivery.headers
        workflow_id = headers.get_str(msg_headers, headers.WORKFLOW_ID)
        task_id = headers.get_str(msg_headers, headers.TASK_ID)
        if not workflow_id or not task_id:
            await self._park(
                delivery, "malformed_task", "missing fabric-workflow-id or fabric-task-id header"
            )
            return
        try:
            body = codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
            if not isinstance(body, dict):
                raise ProtocolError("task body must be a map with 'input' and 'upstream'", delivery.body)
        except ProtocolError as exc:
            await self._park(delivery, "malformed_task", str(exc))
            return
        timeout_s = (
            headers.get_float(msg_headers, headers.TIMEOUT_S, None)
            or handler.timeout_s
            or (self.settings.worker.default_timeout_s)
        )
        task = Task(
            input=body.get("input"),
            upstream=dict(body.get("upstream") or {}),
            workflow_id=workflow_id,
            task_id=task_id,
            capability=handler.capability,
            attempt=headers.get_int(msg_headers, headers.ATTEMPT, 1),
            max_attempts=headers.get_int(msg_headers, headers.MAX_ATTEMPTS, 1),
            agent_id=self.agent_id,
            timeout_s=timeout_s,
            cancelled=threading.Event(),
        )
        async with self._slots:
            try:
                await self._event(task, EventStatus.STARTED)
                status, result, error = await self._run(handler, task)
                await self._event(task, status, result=result, error=error)
            except TransportError as exc:
                # The outcome is not confirmed, so the task must not be acked: the broker redelivers it.
                log.warning(
                    "could not report task %s/%s (%s); leaving it to redelivery", workflow_id, task_id, exc
                )
                await delivery.nack(requeue=True)
                return
        await delivery.ack()

    async def _run(self, handler: Handler, task: Task) -> tuple[EventStatus, Any, ErrorInfo | None]:
        """Run the handler once; return the event status, result and error to report."""
        try:
            if handler.is_async:
                result = await asyncio.wait_for(handler.func(task), task.timeout_s)
            else:
                future = asyncio.get_running_loop().run_in_executor(self._executor, handler.func, task)
                # A thread cannot be killed: on timeout the task is reported failed and its flag set, so a
                # cooperative handler stops; a handler that never checks keeps its thread until it returns.
                result = await asyncio.wait_for(future, task.timeout_s)
            codec.encode(result)  # a result the wire cannot carry fails the task here, not at the router
        except TimeoutError:
            task.cancelled.set()
            error = ErrorInfo(
                type="TimeoutError", message=f"task exceeded its timeout of {task.timeout_s:g}s"
            )
            return self._failed(task, error, None)
        except HandlerSignal as signal:
            return self._failed(
                task, ErrorInfo(type=type(signal).__name__, message=str(signal)), type(signal).__name__
            )
        except ProtocolError as exc:
            return self._failed(task, ErrorInfo(type="ResultNotSerializable", message=str(exc)), None)
        except Exception as exc:
            log.info("task %s/%s failed: %s: %s", task.workflow_id, task.task_id, type(exc).__name__, exc)
            return self._failed(task, ErrorInfo(type=type(exc).__name__, message=str(exc)), None)
        self.processed += 1
        return EventStatus.SUCCEEDED, result, None

    def _failed(self, task: Task, error: ErrorInfo, signal: str | None) -> tuple[EventStatus, Any, ErrorInfo]:
        self.failed += 1
        decision = self._policy.decide(
            Failure(
                error=error,
                attempt=task.attempt,
                max_attempts=task.max_attempts,
                capability=task.capability,
                signal=signal,
            )
        )
        status = EventStatus.DEAD if decision.action is Action.ABORT else EventStatus.FAILED
        return status, None, decision.error

    async def _event(
        self, task: Task, status: EventStatus, *, result: Any = None, error: ErrorInfo | None = None
    ) -> None:
        event = TaskEvent(
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self.agent_id,
            status=status,
            result=result,
            error=error,
            at=time.time(),
        )
        await self._amqp.publish(
            names.events_exchange(self.ns),
            names.event_routing_key(str(status)),
            codec.encode(event.model_dump(mode="python", exclude_none=True)),
            message_id=f"{task.workflow_id}/{task.task_id}/{task.attempt}/{status}",
        )

    async def _park(self, delivery: Delivery, reason: str, detail: str) -> None:
        parked = dict(delivery.headers)
        parked[headers.DEAD_REASON] = reason
        parked[headers.LAST_ERROR] = detail[:1000]
        parked["fabric-original-routing-key"] = delivery.routing_key
        try:
            await self._amqp.publish(
                names.dead_exchange(self.ns),
                delivery.routing_key,
                delivery.body,
                headers=parked,
                content_type=delivery.content_type or "application/octet-stream",
                message_id=delivery.message_id,
            )
        except TransportError:
            await delivery.nack(requeue=True)
            return
        log.error("parked task message %s: %s: %s", delivery.message_id, reason, detail)
        await delivery.ack()

    # -- heartbeats -------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        interval = self.settings.worker.heartbeat_interval_s
        host = socket.gethostname()
        while True:
            beat = Heartbeat(
                agent_id=self.agent_id,
                agent=self.agent.name,
                host=host,
                pid=os.getpid(),
                capabilities=self.agent.capabilities,
                concurrency=self.concurrency,
                in_flight=self.in_flight,
                processed=self.processed,
                failed=self.failed,
                health="draining" if self._draining else "ok",
                at=time.time(),
            )
            try:
                await self._amqp.publish(
                    names.heartbeats_exchange(self.ns),
                    "",
                    codec.encode(beat.model_dump(mode="python")),
                    persistent=False,
                    mandatory=False,
                    expiration_s=max(interval * 3, 1.0),
                )
            except TransportError as exc:
                log.warning("heartbeat not sent: %s", exc)
            await asyncio.sleep(interval)
