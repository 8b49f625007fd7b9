"""Carrying an attempt's :class:`~fabric.worker.outcome.Outcome` out, in the contract's order
(docs/protocol.md §5, §5a): first the copy that keeps the task alive (the retry through ``{ns}.retry``,
the reassigned next attempt on ``{ns}.tasks``, the parked copy on ``{ns}.dead``), confirmed; then the
event, confirmed; only then the ack of the task message. A crash in between repeats a step; it never
loses the task.

When a publish is not confirmed, the message is not acked: it goes back to its queue after a pause
(:func:`requeue_later`), so a broker that keeps refusing publishes does not turn the task into a hot
redelivery loop. Every message this worker parks, a task's or one it cannot read, is parked here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from fabric.errors import TransportError
from fabric.metrics import WorkerCounter, WorkerMetrics
from fabric.policy import Decision
from fabric.protocol import codec, headers
from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent
from fabric.protocol.task_message import TaskMessage
from fabric.telemetry import Telemetry
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from fabric.transport.parking import park_as_received
from fabric.worker.agent import Task
from fabric.worker.outcome import Origin, Outcome

log = logging.getLogger("fabric.worker")

#: Pause before a task whose events could not be published goes back to the queue, so a broker that
#: keeps refusing publishes does not turn the task into a hot redelivery loop.
NACK_PAUSE_S = 1.0

#: The worker counter moved by the fate of an attempt another worker lost.
_LOST_COUNTER: dict[EventStatus, WorkerCounter] = {
    EventStatus.RETRYING: "retried",
    EventStatus.ESCALATED: "escalated",
    EventStatus.DEAD: "parked",
}


async def requeue_later(deliveries: Sequence[Delivery]) -> None:
    """Pause, then nack ``deliveries`` back to their queue (their outcome could not be published)."""
    await asyncio.sleep(NACK_PAUSE_S)
    for delivery in deliveries:
        await delivery.nack(requeue=True)


@contextlib.asynccontextmanager
async def settling(deliveries: Sequence[Delivery]) -> AsyncIterator[None]:
    """Ack ``deliveries`` once the publishes of the block are confirmed; when one is not (a
    :class:`TransportError`), pause, then nack them back to their queue, and go on.

    Example:
        >>> async with settling([delivery]):
        ...     await settlement.event(task, EventStatus.CANCELLED, error=CANCELLED_ERROR)
    """
    try:
        yield
    except TransportError:
        await requeue_later(deliveries)
        return
    for delivery in deliveries:
        await delivery.ack()


def task_message(delivery: Delivery) -> TaskMessage:
    """The task message a delivery carries."""
    return TaskMessage.received(
        delivery.headers,
        delivery.body,
        message_id=delivery.message_id,
        priority=delivery.priority,
        content_type=delivery.content_type,
    )


def counters(outcome: Outcome) -> list[WorkerCounter]:
    """The worker counters an outcome moves once it is reported."""
    status = outcome.status
    if outcome.origin is Origin.LOST:
        # Not this worker's failure (another one lost the attempt): retried, parked or escalated.
        return [_LOST_COUNTER.get(status, "parked")]
    if outcome.origin is Origin.NO_OTHER_AGENT:
        return ["escalated" if status is EventStatus.ESCALATED else "parked"]
    if status is EventStatus.SUCCEEDED:
        return ["succeeded"]
    if status is EventStatus.CANCELLED:
        return []
    if status in (EventStatus.RETRYING, EventStatus.REASSIGNED):
        return ["failed", "retried"]
    if status is EventStatus.DEAD:
        return ["failed", "parked"]
    if status is EventStatus.ESCALATED:
        return ["failed", "escalated"]
    return ["failed"]


class Settlement:
    """Publishes what this worker has to say about its tasks: events, and the copies of task messages
    (retried, reassigned, handed on, returned, parked)."""

    def __init__(
        self,
        amqp: AmqpConnection,
        ns: str,
        agent_id: str,
        *,
        telemetry: Telemetry,
        metrics: WorkerMetrics,
        capabilities: Sequence[str],
    ) -> None:
        self._amqp = amqp
        self._ns = ns
        self._agent_id = agent_id
        self._telemetry = telemetry
        self._metrics = metrics
        self._capabilities = frozenset(capabilities)

    async def carry_out(
        self, delivery: Delivery, task: Task, outcome: Outcome, *, started_at: float | None = None
    ) -> None:
        """The copy the outcome asks for, then its event, each confirmed; the caller acks after.

        Raises:
            TransportError: a publish was not confirmed (then the message must not be acked).
        """
        decision = outcome.decision
        if outcome.status is EventStatus.RETRYING and decision is not None:
            await self.retry_later(delivery, task, decision, avoid_self=outcome.avoid_self)
        elif outcome.status is EventStatus.REASSIGNED:
            await self.reassign(delivery, task)
        elif outcome.status is EventStatus.DEAD and decision is not None:
            await self.park_task(delivery, task, decision)
        elif outcome.status is EventStatus.ESCALATED:
            # No copy is kept in the broker: the router holds the task's input and upstream results,
            # and publishes it afresh when an operator resumes it.
            log_escalation(task, decision)
        await self.event(
            task,
            outcome.status,
            result=outcome.result,
            error=outcome.error,
            retry_in_s=outcome.retry_in_s,
            reason=outcome.reason,
            started_at=started_at,
        )

    def count(self, capability: str, outcome: Outcome) -> None:
        """Move the counters of an outcome that was reported."""
        for counter in counters(outcome):
            self._metrics.count(counter, capability)

    async def event(
        self,
        task: Task,
        status: EventStatus,
        *,
        result: Any = None,
        error: ErrorInfo | None = None,
        retry_in_s: float | None = None,
        reason: str | None = None,
        lease_s: float | None = None,
        started_at: float | None = None,
    ) -> None:
        """Publish an event of ``task`` to ``{ns}.events`` (confirmed)."""
        now = time.time()
        event = TaskEvent(
            started_at=started_at,
            reason=reason if status in (EventStatus.ESCALATED, EventStatus.DEAD) else None,
            retry_at=None if retry_in_s is None else now + retry_in_s,
            lease_s=lease_s,
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self._agent_id,
            status=status,
            result=result,
            error=error,
            at=now,
        )
        trace_headers: dict[str, Any] = {}
        self._telemetry.inject(trace_headers)  # the router releases dependents under this attempt's span
        await self._amqp.publish(
            names.events_exchange(self._ns),
            names.event_routing_key(str(status)),
            codec.encode(event.model_dump(mode="python", exclude_none=True)),
            message_id=f"{task.workflow_id}/{task.task_id}/{task.attempt}/{status}",
            headers=trace_headers or None,
        )

    async def republish(self, capability: str, message: TaskMessage) -> None:
        """Publish a copy of the task message to ``{ns}.tasks`` (a fresh message, not a redelivery)."""
        await self._amqp.publish(
            names.tasks_exchange(self._ns), capability, message.body, **message.properties()
        )

    async def return_unstarted(self, delivery: Delivery) -> None:
        """Give a task this worker will not start back to its queue as a fresh message.

        A nack would mark it redelivered, and a redelivered task counts as a lost attempt.
        """
        try:
            await self.republish(delivery.routing_key, task_message(delivery))
        except TransportError:
            await delivery.nack(requeue=True)
            return
        await delivery.ack()

    async def reassign(self, delivery: Delivery, task: Task) -> None:
        """The handler raised ``Reassign``: the next attempt must run on another agent, at once."""
        moved = task_message(delivery).reassigned(
            self._agent_id, now_ms=headers.now_ms(), previous_attempt=self._telemetry.current()
        )
        await self.republish(task.capability, moved)

    async def retry_later(
        self, delivery: Delivery, task: Task, decision: Decision, *, avoid_self: bool = True
    ) -> None:
        """Send the task message through ``{ns}.retry`` to wait in its delay tier, attempt + 1.

        The wait happens in the broker: ``{ns}.delay.<tier>`` dead-letters the message back to
        ``{ns}.tasks`` with its capability routing key when it expires.
        """
        delay_ms = decision.delay_ms or 0
        retry = task_message(delivery).retried(
            tier=decision.tier,
            delay_ms=delay_ms,
            last_error=f"{decision.error.type}: {decision.error.message}",
            # The next attempt goes to another agent whenever one takes it (reassignment).
            avoid=self._agent_id if avoid_self else None,
            now_ms=headers.now_ms(),
            previous_attempt=self._telemetry.current(),
        )
        await self._amqp.publish(
            names.retry_exchange(self._ns), task.capability, retry.body, **retry.properties()
        )
        log.info(
            "task %s/%s attempt %d failed (%s); retry %d in %s",
            task.workflow_id,
            task.task_id,
            task.attempt,
            decision.error.type,
            task.attempt + 1,
            decision.tier,
        )

    async def park_task(self, delivery: Delivery, task: Task, decision: Decision) -> None:
        """Park a task that will not run again on ``{ns}.dead``, with why and its last error."""
        parked = task_message(delivery).parked(
            reason=decision.reason or "aborted",
            last_error=f"{decision.error.type}: {decision.error.message}",
            routing_key=delivery.routing_key,
            agent_id=self._agent_id,
            now_ms=headers.now_ms(),
        )
        await self._amqp.publish(
            names.dead_exchange(self._ns), delivery.routing_key, parked.body, **parked.properties()
        )
        log.warning(
            "task %s/%s parked after %d attempt(s): %s: %s",
            task.workflow_id,
            task.task_id,
            task.attempt,
            decision.reason,
            decision.error.type,
        )

    async def park(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Park a message this worker cannot run (not a task message it can read, or one it failed on)
        on ``{ns}.dead`` as it came, with why; then ack it. Unconfirmed: back to its queue, later."""
        try:
            await park_as_received(
                self._amqp, names.dead_exchange(self._ns), delivery, reason=reason, detail=detail
            )
        except TransportError:
            await requeue_later([delivery])  # no hot loop while the broker refuses publishes
            return
        log.error("parked task message %s: %s: %s", delivery.message_id, reason, detail)
        # A task message reaches a capability queue with its capability as the routing key.
        if delivery.routing_key in self._capabilities:
            self._metrics.count("parked", delivery.routing_key)
        await delivery.ack()


def log_escalation(task: Task, decision: Decision | None) -> None:
    """Say in the log that ``task`` waits for an operator now."""
    error = decision.error if decision is not None else None
    log.warning(
        "task %s/%s escalated to an operator after attempt %d (%s): %s",
        task.workflow_id,
        task.task_id,
        task.attempt,
        decision.reason if decision is not None else "?",
        f"{error.type}: {error.message}" if error is not None else "",
    )


class DeferredStart:
    """A task's ``started`` event, sent only if the task still runs after ``delay`` seconds
    (``FABRIC_WORKER__STARTED_AFTER_S``).

    Example:
        >>> announcer = DeferredStart(settlement.event(task, EventStatus.STARTED), 0.5)
        >>> ...  # the handler runs
        >>> started_at = None if await announcer.settle() else began_at
    """

    def __init__(self, send: Coroutine[Any, Any, None], delay: float) -> None:
        self._send = send
        self._sending = False
        self._task = asyncio.ensure_future(self._later(delay))

    async def _later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._sending = True
        await self._send

    async def settle(self) -> bool:
        """Once the handler ended: True when the event went out (waits for its confirm; raises
        TransportError when it could not be sent), False when it never will."""
        if not self._sending:
            self.cancel()
            return False
        await self._task
        return True

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled():
            self._task.exception()  # retrieved: the attempt's own error path has reported what matters
        if not self._sending:
            self._send.close()  # never started: closed, not left unawaited
