"""The pipeline one delivered task goes through, in order (:meth:`Pipeline.on_task`).

Read the task message (unreadable: parked). A copy of an attempt held or reported here is adopted,
never run twice (:mod:`.attempts`); a cancelled task is dropped; a task this agent must avoid is handed
on; a redelivered one is a lost attempt. Else it waits for a concurrency slot and runs
(:mod:`.execution`), under a lease once it has run ``lease_after_s`` (:mod:`.lease`); what it came to
(:mod:`.outcome`, pure) is carried out in the contract's order, copy, then event, then ack
(:mod:`.settlement`, docs/protocol.md §5). If the process dies anywhere before the ack, the broker
redelivers the task.

Example:
    >>> pipeline = Pipeline(agent_id, settings, concurrency=4, policy=..., parts=...)
    >>> await pipeline.on_task(agent.handlers["demo.echo"], delivery)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fabric.errors import ProtocolError, TransportError
from fabric.metrics import WorkerMetrics
from fabric.policy import FailurePolicy
from fabric.protocol import headers
from fabric.protocol.messages import EventStatus, OnExhausted
from fabric.protocol.task_message import TaskMessage
from fabric.settings import FabricSettings
from fabric.telemetry import Span, SpanKind, SpanLink, Telemetry, messaging_attributes
from fabric.topology import names
from fabric.transport.amqp import Delivery
from fabric.worker import outcome as outcome_
from fabric.worker.agent import Handler, Task
from fabric.worker.attempts import AttemptKey, AttemptsBook, Running
from fabric.worker.cancels import CancelSync
from fabric.worker.consumers import Consumers
from fabric.worker.execution import Execution, Slot
from fabric.worker.lease import Leases, finish_handover
from fabric.worker.settlement import DeferredStart, Settlement, requeue_later, settling, task_message

log = logging.getLogger("fabric.worker")


@dataclass(frozen=True, slots=True)
class Parts:
    """The worker's parts a delivery goes through."""

    settlement: Settlement
    execution: Execution
    book: AttemptsBook
    leases: Leases
    consumers: Consumers
    cancels: CancelSync
    telemetry: Telemetry
    metrics: WorkerMetrics


class Pipeline:
    """Takes each delivered task through its steps, and keeps what is in flight.

    Args:
        agent_id: this agent.
        settings: the worker's settings.
        concurrency: how many tasks the worker runs at once.
        policy: decides what a failed attempt comes to.
        parts: the worker's parts a delivery goes through.
    """

    def __init__(
        self,
        agent_id: str,
        settings: FabricSettings,
        *,
        concurrency: int,
        policy: FailurePolicy,
        parts: Parts,
    ) -> None:
        self._agent_id = agent_id
        self._settings = settings
        self._ns = settings.namespace
        self._concurrency = concurrency
        self._policy = policy
        self._settle = parts.settlement
        self._execution = parts.execution
        self._book = parts.book
        self._leases = parts.leases
        self._consumers = parts.consumers
        self._cancels = parts.cancels
        self._telemetry = parts.telemetry
        self._metrics = parts.metrics
        #: The deliveries being taken through the pipeline now (the drain waits for them).
        self.running: set[asyncio.Task[Any]] = set()
        #: Since when a slot has been free without a break (None while at the concurrency limit).
        self.free_since: float | None = time.time()
        #: Copies of attempts held or reported here that arrived again and were not run again.
        self.adopted = 0

    @property
    def in_flight(self) -> int:
        return len(self.running)

    async def on_task(self, handler: Handler, delivery: Delivery) -> None:
        """Take one delivered task through the pipeline (the consumers' callback)."""
        current = asyncio.current_task()
        assert current is not None
        capability = handler.capability
        self._consumers.delivered(capability)
        self.running.add(current)
        self._note_load()
        try:
            await self._process(handler, delivery)
        except Exception as exc:
            # A bug in the runtime, not in the handler: park the message rather than loop on it.
            log.critical("worker failed on task message %s; parking it", delivery.message_id, exc_info=True)
            if not delivery.settled:
                await self._settle.park(delivery, "worker_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.running.discard(current)
            self._note_load()

    def _note_load(self) -> None:
        """Keep :attr:`free_since`: when the worker last went from full (every slot taken by an
        unacked task) to having room. The router's stall watchdog only judges agents with room."""
        if self.in_flight >= self._concurrency:
            self.free_since = None
        elif self.free_since is None:
            self.free_since = time.time()

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
        timeout_s = message.timeout_s or handler.timeout_s or (self._settings.worker.default_timeout_s)
        task = Task(
            input=task_input,
            upstream=upstream,
            workflow_id=workflow_id,
            task_id=task_id,
            capability=handler.capability,
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            agent_id=self._agent_id,
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
        if self._agent_id in message.avoid and await self._pass_on(delivery, task):
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
            self._metrics.count("adopted", running.task.capability)
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
            self._metrics.count("adopted", delivery.routing_key)
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
        destination = names.capability_queue(self._ns, task.capability)
        attributes = messaging_attributes(
            destination,
            "process",
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self._agent_id,
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
            self._settings.worker.lease_after_s, self._leases.begin, running
        )
        announcer: DeferredStart | None = None
        try:
            try:
                delay = self._settings.worker.started_after_s
                if delay > 0:
                    announcer = DeferredStart(self._settle.event(task, EventStatus.STARTED), delay)
                else:
                    await self._settle.event(task, EventStatus.STARTED)
                self._metrics.started(task.capability, _queue_wait_s(delivery))
                began = time.perf_counter()
                began_at = time.time()
                outcome = await self._execution.run(handler, task, slot, self._facts(task))
                # The started event, if it went, is confirmed before the outcome (same channel, in order).
                started_at = began_at if announcer is not None and not await announcer.settle() else None
                label = outcome_.RUN_LABELS[outcome.status]
                self._metrics.ran(task.capability, label, time.perf_counter() - began)
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
                self._consumers.record(handler.capability, outcome, time.perf_counter() - began)
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
            on_exhausted=task.on_exhausted or self._settings.policy.on_exhausted_for(task.capability),
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
