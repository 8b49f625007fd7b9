"""The worker runtime: lifecycle (start, drain, close) and the pipeline each delivered task goes through.

One delivery, in order (:meth:`Worker._process_delivery`): read the task message (unreadable: parked);
a copy of an attempt held or reported here is adopted, never run twice (:mod:`.attempts`); a cancelled
task is dropped; a task this agent must avoid is handed on; a redelivered one is a lost attempt. Else it
waits for a concurrency slot and runs (:mod:`.execution`), under a lease once it has run
``lease_after_s`` (:mod:`.lease`); what it came to (:mod:`.outcome`, pure) is carried out in the
contract's order, copy, then event, then ack (:mod:`.settlement`, docs/protocol.md §5). If the process
dies anywhere before the ack, the broker redelivers the task.

All capability queues are consumed on one channel with one prefetch limit, so a worker never holds more
than ``concurrency`` unacked tasks in all; their breakers and scores are in :mod:`.consumers`, the
heartbeats in :mod:`.heartbeat`, the loops that keep them in named background tasks
(:mod:`.background`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Self

from fabric.errors import (
    NotConnectedError,
    ProtocolError,
    TransportError,
)
from fabric.health import HealthServer, serve_health
from fabric.metrics import WorkerMetrics
from fabric.policy import (
    FailurePolicy,
    RetryPolicy,
)
from fabric.policy import score as scoring
from fabric.protocol import headers
from fabric.protocol.messages import (
    EventStatus,
    Heartbeat,
    HeartbeatHealth,
    OnExhausted,
)
from fabric.protocol.task_message import TaskMessage
from fabric.settings import FabricSettings
from fabric.telemetry import Span, SpanKind, SpanLink, Telemetry, messaging_attributes
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Delivery
from fabric.worker import background
from fabric.worker import outcome as outcome_
from fabric.worker.agent import Agent, Handler, Task
from fabric.worker.attempts import AttemptKey, AttemptsBook, Running
from fabric.worker.cancels import CancelSync
from fabric.worker.consumers import Consumers
from fabric.worker.execution import Execution, Slot
from fabric.worker.heartbeat import Heartbeats
from fabric.worker.lease import Leases, finish_handover
from fabric.worker.settlement import (
    DeferredStart,
    Settlement,
    requeue_later,
    settling,
    task_message,
)

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
        telemetry: Telemetry | None = None,
    ) -> None:
        if not agent.handlers:
            raise ValueError(f"agent {agent.name!r} has no handlers: register some with @agent.handler(...)")
        self.agent = agent
        self.settings = settings
        self.ns = settings.namespace
        self.concurrency = concurrency or settings.worker.concurrency
        self.agent_id = settings.worker.agent_id or f"{agent.name}@{socket.gethostname()}:{os.getpid()}"
        self._policy = policy or RetryPolicy()
        #: Named background tasks: heartbeats, the watchdog, re-scoring, the stop after a fatal error.
        self._background = background.Background()
        #: Since when a slot has been free without a break (None while at the concurrency limit).
        self._free_since: float | None = time.time()
        self._telemetry = telemetry or Telemetry("fabric-worker")
        self._amqp = AmqpConnection(
            settings.amqp_url.get_secret_value(), name=f"fabric-worker:{self.agent_id}"
        )
        #: This worker's Prometheus metrics (a registry of its own), served at ``/metrics``.
        self.metrics = WorkerMetrics(
            agent.capabilities,
            in_flight=lambda: self.in_flight,
            concurrency=self.concurrency,
            overdue_threads=lambda: self.overdue_threads,
            breakers=lambda: self.consumers.breaker_states(),
            under_lease=lambda: len(self._book.leased()),
        )
        self._amqp.on_confirm = self.metrics.observe_publish
        #: Publishes events and copies of task messages, and settles deliveries in the contract's order.
        self._settle = Settlement(
            self._amqp,
            self.ns,
            self.agent_id,
            telemetry=self._telemetry,
            metrics=self.metrics,
            capabilities=agent.capabilities,
        )
        #: Runs the handlers: concurrency slots, time limits, threads.
        self._execution = Execution(
            self.concurrency,
            self._policy,
            draining=lambda: self._draining,
            is_cancelled=self._is_cancelled,
        )
        #: Attempts held here from their delivery until they are settled, and those reported (bounded).
        self._book = AttemptsBook()
        self._leases = Leases(settings.worker, self._settle, self._execution, self.metrics)
        #: The capability queues' consumers, their circuit breakers and scores.
        self.consumers = Consumers(
            agent,
            settings,
            self._amqp,
            draining=lambda: self._draining,
            run=self._on_task,
            give_back=self._settle.return_unstarted,
            on_fatal=self._fatal,
            busy=lambda: min(1.0, (self.in_flight + self.overdue_threads) / self.concurrency),
        )
        self._heartbeats = Heartbeats(
            self._amqp, self.ns, interval_s=settings.worker.heartbeat_interval_s, beat=self._beat
        )
        self._running: set[asyncio.Task[Any]] = set()
        self._host = socket.gethostname()
        #: Workflows and tasks an operator cancelled: running ones are stopped, copies dropped unrun.
        self._cancels = CancelSync(self._amqp, self.ns, on_cancel=self._execution.stop)
        self._health: HealthServer | None = None
        self._draining = False
        self._started = False
        self._stopped = asyncio.Event()
        #: True when the worker stopped because it could not consume any more (the CLI exits non-zero).
        self.failed_fatally = False
        #: Copies of attempts held or reported here that arrived again and were not run again.
        self.adopted = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise NotConnectedError("a Worker cannot be started twice; create a new one")
        self._started = True
        try:
            await self._amqp.connect()
            await self._amqp.declare(spec.build(self.ns, self.agent.capabilities))
            # Cancellations are broadcast on {ns}.control: bound before any task is consumed, so none
            # is missed; the ones before are asked of the router (tasks wait for that list).
            await self._cancels.start()
            # One channel, one prefetch for every capability: at most `concurrency` unacked tasks in all,
            # so the tasks this worker cannot start yet stay in their queues for idle workers.
            # Every consumer starts at the top score (no record yet) and moves with its record.
            consumers = await self._amqp.consume_many(
                {
                    names.capability_queue(self.ns, capability): functools.partial(
                        self._on_task, self.agent.handlers[capability]
                    )
                    for capability in self.agent.capabilities
                },
                prefetch=self.concurrency,
                channel_wide=True,
                priorities={
                    names.capability_queue(self.ns, capability): scoring.MAX_SCORE
                    for capability in self.agent.capabilities
                },
            )
            self.consumers.subscribed(consumers)
            http = self.settings.http
            # Many workers may share a host: a taken port falls back to a free one (logged).
            self._health = await serve_health(
                http.host,
                http.worker_port,
                checks={"broker": self._check_broker, "consumers": self._check_consumers},
                metrics=self.render_metrics,
                fallback=True,
            )
        except BaseException:
            await self._close()
            raise
        self._background.start(
            "heartbeats",
            self._heartbeats.run(leased=self._renewing, health=self._health_now, each=self._each_beat),
        )
        self._background.start("watchdog", self.consumers.watchdog())
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
        timeout = self.settings.worker.drain_timeout_s if timeout_s is None else timeout_s
        running = len(self._running)
        log.info(
            "worker %s draining: taking no new tasks, waiting up to %.0fs for %d running",
            self.agent_id,
            timeout,
            running,
        )
        for consumer in self.consumers.of.values():
            await consumer.cancel()
        # Tasks received but not started (waiting for a slot) go back to their queues now, unstarted.
        self._execution.stop_waiting()
        pending: set[asyncio.Task[Any]] = set()
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=timeout)
            if pending:
                log.warning(
                    "drain deadline passed with %d tasks running; the broker will redeliver them",
                    len(pending),
                )
                for task in pending:
                    task.cancel()
                # Let the cancelled tasks nack their deliveries before the connection closes.
                await asyncio.wait(pending, timeout=1.0)
        if self.overdue_threads:
            log.warning(
                "%d sync handlers are still running past their task; their threads end with the process",
                self.overdue_threads,
            )
        await self._background.stop("heartbeats")
        if not self.failed_fatally:
            # A clean stop says so, or the router would take the silence for a crash (``lost``). A fatal
            # stop stays silent on purpose: ``lost`` and its alert are what an operator should see then.
            await self._heartbeats.final(self.agent_id)
        await self._close()
        if self.failed_fatally:
            log.warning("worker %s stopped after a fatal error", self.agent_id)
        else:
            log.info(
                "worker %s stopped: drained %d tasks%s",
                self.agent_id,
                running - len(pending),
                f" ({len(pending)} left to the broker)" if pending else "",
            )

    async def _close(self) -> None:
        # Closing may run in a background task (the stop after a fatal error): it is not cancelled.
        self.consumers.stop()
        await self._background.stop_all()
        await self._cancels.close()
        if self._health is not None:
            await self._health.__aexit__(None, None, None)
        await self._amqp.close()
        await asyncio.to_thread(self._telemetry.shutdown)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def overdue_threads(self) -> int:
        """Sync handlers still running on their threads after their task ended (timed out, cancelled)."""
        return self._execution.overdue_threads

    @property
    def processed(self) -> int:
        """Runs that succeeded."""
        return self._execution.processed

    @property
    def failed(self) -> int:
        """Runs that failed (cancelled ones are not counted)."""
        return self._execution.failed

    @property
    def leased(self) -> int:
        """Attempts handed over to a lease (their message acked while they ran on)."""
        return self._leases.leased

    @property
    def http_port(self) -> int | None:
        return self._health.port if self._health else None

    async def _check_broker(self) -> str | None:
        return None if self._amqp.connected else "broker connection is down"

    async def _check_consumers(self) -> str | None:
        if self._draining:
            return "draining"
        idle = self.consumers.idle()
        return f"not consuming {', '.join(idle)}" if idle else None

    def render_metrics(self) -> str:
        """The Prometheus text exposition served at ``/metrics``."""
        return self.metrics.render()

    # -- tasks ------------------------------------------------------------------------------------

    async def _on_task(self, handler: Handler, delivery: Delivery) -> None:
        current = asyncio.current_task()
        assert current is not None
        capability = handler.capability
        self.consumers.delivered(capability)
        self._running.add(current)
        self._note_load()
        try:
            await self._process(handler, delivery)
        except Exception as exc:
            # A bug in the runtime, not in the handler: park the message rather than loop on it.
            log.critical("worker failed on task message %s; parking it", delivery.message_id, exc_info=True)
            if not delivery.settled:
                await self._settle.park(delivery, "worker_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._running.discard(current)
            self._note_load()

    def _note_load(self) -> None:
        """Keep :attr:`_free_since`: when the worker last went from full (every slot taken by an
        unacked task) to having room. The router's stall watchdog only judges agents with room."""
        if self.in_flight >= self.concurrency:
            self._free_since = None
        elif self._free_since is None:
            self._free_since = time.time()

    async def _process(self, handler: Handler, delivery: Delivery) -> None:
        try:
            await self._process_delivery(handler, delivery)
        except BaseException as exc:
            # An Exception here is a runtime bug, and _on_task parks the message. Anything else
            # (cancelled at the drain deadline, interrupted) must not leave the delivery unsettled, or it
            # blocks a prefetch slot until the connection closes: back to the queue it goes.
            if not isinstance(exc, Exception) and not delivery.settled:
                await delivery.nack(requeue=True)
            raise

    async def _process_delivery(self, handler: Handler, delivery: Delivery) -> None:
        message = task_message(delivery)
        workflow_id, task_id = message.workflow_id, message.task_id
        if not workflow_id or not task_id:
            await self._settle.park(
                delivery, "malformed_task", "missing fabric-workflow-id or fabric-task-id header"
            )
            return
        try:
            task_input, upstream = message.payload()
        except ProtocolError as exc:
            await self._settle.park(delivery, "malformed_task", str(exc))
            return
        timeout_s = message.timeout_s or handler.timeout_s or (self.settings.worker.default_timeout_s)
        task = Task(
            input=task_input,
            upstream=upstream,
            workflow_id=workflow_id,
            task_id=task_id,
            capability=handler.capability,
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            agent_id=self.agent_id,
            timeout_s=timeout_s,
            cancelled=threading.Event(),
            on_exhausted=_on_exhausted_header(message.on_exhausted),
        )
        key = (workflow_id, task_id, task.attempt)
        # Until the list of cancels is in (bounded wait), a copy of a cancelled task cannot be told apart.
        await self._cancels.ready()
        if await self._adopt(key, delivery):
            return
        if self._is_cancelled(task):
            # Wherever the copy came from (its queue, a delay queue, handed back, redelivered): dropped.
            await self._drop_cancelled(task, [delivery])
            return
        if self.agent_id in message.avoid and await self._pass_on(delivery, task):
            return
        if delivery.redelivered:
            # The lost attempt's own span died with its worker: this one stands for it in the trace.
            with self._attempt_span(task, message, lost=True) as span:
                await self._lost_attempt(delivery, task, span)
            return
        running = Running(task, [delivery])
        self._book.hold(running)
        try:
            await self._start(handler, running)
        except BaseException:
            for copy in running.deliveries[1:]:  # the first one is settled by the caller
                if not copy.settled:
                    await copy.nack(requeue=True)
            raise
        finally:
            self._book.release(running)

    async def _adopt(self, key: AttemptKey, delivery: Delivery) -> bool:
        """Another copy of an attempt this worker holds or has reported: never run it a second time.

        The broker closed the consumer channel under a running task (``consumer_timeout``, a dropped
        connection) and requeued its message, or a router republished it. A copy of a running attempt is
        settled with it (acked at once when the attempt runs under a lease); a redelivered copy of an
        attempt already reported is acked. Returns True when handled.
        """
        running = self._book.held(key)
        if running is not None:
            self.adopted += 1
            self.metrics.count("adopted", running.task.capability)
            log.info(
                "task %s/%s attempt %d was delivered again while it runs here: adopting the copy",
                *key,
            )
            if running.leased:
                await delivery.ack()
            else:
                running.deliveries.append(delivery)
            return True
        if self._book.was_reported(key, redelivered=delivery.redelivered):
            self.adopted += 1
            self.metrics.count("adopted", delivery.routing_key)
            log.info("task %s/%s attempt %d was delivered again after it was reported: acking", *key)
            await delivery.ack()
            return True
        return False

    async def _start(self, handler: Handler, running: Running) -> None:
        task = running.task
        delivery = running.deliveries[0]
        slot = await self._execution.take_slot()
        if slot is None:
            # Draining: a task not started yet is another worker's to run (one copy of it is enough).
            log.info("draining: returning task %s/%s to its queue unstarted", task.workflow_id, task.task_id)
            await self._settle.return_unstarted(delivery)
            for copy in running.deliveries[1:]:
                await copy.ack()
            return
        if self._is_cancelled(task):
            slot.release()  # cancelled while it waited for the slot
            await self._drop_cancelled(task, running.deliveries)
            return
        with self._attempt_span(task, task_message(delivery)) as span:
            await self._attempt(handler, running, slot, span)

    def _attempt_span(
        self, task: Task, message: TaskMessage, *, lost: bool = False
    ) -> contextlib.AbstractContextManager[Span]:
        """The span of one attempt, under the publish that released the task (a retry keeps that
        parent), linked to the previous attempt and to the task's other dependencies. The handler's
        own spans, made with the plain OpenTelemetry API, nest under it."""
        destination = names.capability_queue(self.ns, task.capability)
        attributes = messaging_attributes(
            destination,
            "process",
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self.agent_id,
            attempt_lost=True if lost else None,
        )
        links: list[SpanLink] = []
        if self._telemetry.enabled:
            previous = message.previous_attempt
            if previous:
                links.append((previous, {"fabric.link.type": "previous_attempt"}))
            for dependency, traceparent in message.links.items():
                links.append((traceparent, {"fabric.link.type": "dependency", "fabric.task.id": dependency}))
        return self._telemetry.span(
            f"process {destination}",
            SpanKind.CONSUMER,
            attributes,
            parent=self._telemetry.extract(dict(message.headers)),
            links=links,
        )

    async def _attempt(self, handler: Handler, running: Running, slot: Slot, span: Span) -> None:
        task, delivery = running.task, running.deliveries[0]
        workflow_id, task_id = task.workflow_id, task.task_id
        # A timer, not a task per attempt: most attempts end long before it fires.
        timer = asyncio.get_running_loop().call_later(
            self.settings.worker.lease_after_s, self._leases.begin, running
        )
        announcer: DeferredStart | None = None
        try:
            try:
                delay = self.settings.worker.started_after_s
                if delay > 0:
                    announcer = DeferredStart(self._settle.event(task, EventStatus.STARTED), delay)
                else:
                    await self._settle.event(task, EventStatus.STARTED)
                self.metrics.started(task.capability, _queue_wait_s(delivery))
                began = time.perf_counter()
                began_at = time.time()
                outcome = await self._execution.run(handler, task, slot, self._facts(task))
                # The started event, if it went, is confirmed before the outcome (same channel, in order).
                started_at = began_at if announcer is not None and not await announcer.settle() else None
                label = outcome_.RUN_LABELS[outcome.status]
                self.metrics.ran(task.capability, label, time.perf_counter() - began)
                timer.cancel()
                await finish_handover(running)
                if running.leased and not self._leases.held(running):
                    # Not renewed for half its lifetime: the router may have given the attempt up and run
                    # it again already, so this one reports nothing (a retry it sent would run twice).
                    log.warning(
                        "task %s/%s attempt %d: its lease could not be renewed; dropping its outcome "
                        "(the router runs it again when the lease lapses)",
                        workflow_id,
                        task_id,
                        task.attempt,
                    )
                    return
                if outcome.error is not None:
                    self._telemetry.failed(span, outcome.error.type, outcome.error.message)
                if self._is_cancelled(task):
                    outcome = outcome_.cancelled()
                self.consumers.record(handler.capability, outcome, time.perf_counter() - began)
                # The retry or the parked copy is confirmed before the event, and both before the ack:
                # a crash in between repeats a step, it never loses the task.
                await self._settle.carry_out(delivery, task, outcome, started_at=started_at)
                self._settle.count(task.capability, outcome)
            except TransportError as exc:
                if running.leased:
                    # The message is acked: the lease, no longer renewed, lapses and the router runs
                    # the task again.
                    log.warning(
                        "could not report task %s/%s (%s); the router runs it again when its lease lapses",
                        workflow_id,
                        task_id,
                        exc,
                    )
                    return
                # The outcome is not confirmed, so the task must not be acked: the broker redelivers it,
                # after a pause so a broker refusing publishes does not spin it in a hot loop.
                log.warning(
                    "could not report task %s/%s (%s); leaving it to redelivery", workflow_id, task_id, exc
                )
                slot.release()
                await requeue_later(running.deliveries)
                return
            self._book.reported(task)
            for copy in running.deliveries:
                await copy.ack()
        finally:
            timer.cancel()
            if announcer is not None:
                announcer.cancel()
            if running.handover is not None:
                running.handover.cancel()
            slot.release()

    def _facts(self, task: Task) -> outcome_.Attempt:
        """What the failure policy needs of ``task``; what happens once it is out of attempts is the
        task's ``fabric-on-exhausted`` header, else this worker's settings for its capability."""
        return outcome_.Attempt(
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            capability=task.capability,
            on_exhausted=task.on_exhausted or self.settings.policy.on_exhausted_for(task.capability),
        )

    def _is_cancelled(self, task: Task) -> bool:
        return self._cancels.covers(task.workflow_id, task.task_id)

    async def _drop_cancelled(self, task: Task, deliveries: list[Delivery]) -> None:
        """A copy of a cancelled task: report it ``cancelled`` (so the router knows the copy is gone)
        and ack it, unrun. Nothing is counted, handed on or parked."""
        async with settling(deliveries):
            await self._settle.event(task, EventStatus.CANCELLED, error=outcome_.CANCELLED_ERROR)
            log.info(
                "dropped a copy of cancelled task %s/%s (attempt %d)",
                task.workflow_id,
                task.task_id,
                task.attempt,
            )

    async def _pass_on(self, delivery: Delivery, task: Task) -> bool:
        """This agent failed the task before: hand it on to another agent (back to the queue).

        Bounded: after ``MAX_BOUNCES`` hand-overs no other agent took it. A task reassigned by its
        handler (``Reassign``) is then parked as ``no_other_agent``; one that merely failed here before
        is run here after all (a retry on the same agent beats no retry). Returns True when handled.
        """
        message = task_message(delivery)
        bounces = message.bounces
        if bounces >= MAX_BOUNCES and not message.must_avoid:
            return False
        async with settling([delivery]):
            if bounces >= MAX_BOUNCES:
                outcome = outcome_.no_other_agent(message.avoid, bounces, self._facts(task).on_exhausted)
                await self._settle.carry_out(delivery, task, outcome)
                self._settle.count(task.capability, outcome)
            else:
                await self._settle.republish(task.capability, message.handed_on())
        return True

    async def _lost_attempt(self, delivery: Delivery, task: Task, span: Span) -> None:
        """A redelivered task message: a consumer got this attempt before and never settled it, because
        its worker died (or lost the broker connection) while running it. That counts as an attempt,
        so a task that kills its worker every time is parked as ``worker_lost`` instead of looping."""
        outcome = outcome_.lost(self._facts(task), self._policy)
        assert outcome.error is not None
        self._telemetry.failed(span, outcome.error.type, outcome.error.message)
        try:
            await self._settle.carry_out(delivery, task, outcome)
        except TransportError as exc:
            log.warning("could not handle lost attempt of %s/%s (%s)", task.workflow_id, task.task_id, exc)
            await requeue_later([delivery])
            return
        self._settle.count(task.capability, outcome)
        await delivery.ack()

    def _fatal(self) -> None:
        """The worker cannot consume any more: it stops, in the background (the caller is one of its
        own background tasks, which the stop cancels)."""
        self.failed_fatally = True
        self._background.start("fatal-drain", self.drain())

    # -- heartbeats -------------------------------------------------------------------------------

    def _each_beat(self) -> None:
        # Re-scoring may wait on the broker (basic.cancel + basic.consume): never the heartbeats.
        if not self._draining and not self._background.running("rescore"):
            self._background.start("rescore", self.consumers.rescore())

    def _renewing(self) -> list[Running]:
        """The leased attempts whose leases a heartbeat renews now (a lease that lapsed is given up)."""
        return [running for running in self._book.leased() if self._leases.held(running)]

    def _health_now(self) -> HeartbeatHealth:
        return "draining" if self._draining else "ok"

    def _beat(self, health: HeartbeatHealth, leases: list[Running]) -> Heartbeat:
        """This agent's heartbeat now: ``health`` as given, renewing the leases of ``leases``."""
        return Heartbeat(
            leases=[(r.task.workflow_id, r.task.task_id, r.task.attempt) for r in leases],
            interval_s=self.settings.worker.heartbeat_interval_s,
            agent_id=self.agent_id,
            agent=self.agent.name,
            host=self._host,
            pid=os.getpid(),
            capabilities=self.agent.capabilities,
            concurrency=self.concurrency,
            in_flight=self.in_flight,
            processed=self.processed,
            failed=self.failed,
            health=health,
            breakers=self.consumers.breaker_states(),
            free_since=self._free_since,
            consumers=self.consumers.states(),
            at=time.time(),
        )


#: Hand-overs of a task this agent must avoid before it is parked as ``no_other_agent``.
MAX_BOUNCES = 20


def _queue_wait_s(delivery: Delivery) -> float | None:
    """Seconds since the task became ready (its ``fabric-dispatched-at-ms``), None without the header.
    Clocks of different hosts may disagree: a negative wait reads as 0."""
    dispatched_ms = task_message(delivery).dispatched_at_ms
    if dispatched_ms <= 0:
        return None
    return max(0.0, time.time() - dispatched_ms / 1000)


def _on_exhausted_header(raw: str) -> OnExhausted | None:
    try:
        return OnExhausted(raw) if raw else None
    except ValueError:
        log.warning("ignoring unknown %s header %r", headers.ON_EXHAUSTED, raw)
        return None
