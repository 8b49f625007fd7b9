"""Leases: a task still running after ``lease_after_s`` is handed over to a lease (docs/protocol.md §5b).

RabbitMQ closes a channel whose delivery stays unacked past its ``consumer_timeout`` (30 min by default)
and requeues every unacked message on it, while the handlers go on running. So the worker publishes
``started`` with ``lease_s`` (confirmed), acks the message, and from then on its heartbeats renew the
lease; the router runs the task again as a new attempt if the lease lapses. A leased attempt whose
renewals stopped for half its lease is given up here first (its handler stopped, its outcome dropped),
so it never reports after the router may have run it again.

Example:
    >>> leases = Leases(settings.worker, settlement, execution, metrics)
    >>> timer = loop.call_later(settings.worker.lease_after_s, leases.begin, running)
    >>> leases.held(running)
    True
"""

from __future__ import annotations

import asyncio
import logging
import time

from fabric.errors import TransportError
from fabric.metrics import WorkerMetrics
from fabric.protocol.messages import EventStatus
from fabric.settings import WorkerSettings
from fabric.worker.attempts import Running
from fabric.worker.execution import Execution
from fabric.worker.settlement import NACK_PAUSE_S, Settlement

log = logging.getLogger("fabric.worker")


def lapsing(renewed_at: float, now: float, ttl_s: float) -> bool:
    """True once a lease renewed at ``renewed_at`` went more than half its ``ttl_s`` without renewal
    (monotonic seconds): the router may give it up before another renewal reaches it."""
    return now - renewed_at > ttl_s / 2


class Leases:
    """Hands long attempts over to leases and tells whether a lease still holds."""

    def __init__(
        self,
        settings: WorkerSettings,
        settlement: Settlement,
        execution: Execution,
        metrics: WorkerMetrics,
    ) -> None:
        self._settings = settings
        self._settle = settlement
        self._execution = execution
        self._metrics = metrics
        #: Attempts handed over to a lease (their message acked while they ran on).
        self.leased = 0

    def begin(self, running: Running) -> None:
        """``lease_after_s`` has passed: start handing the attempt over (a timer's callback)."""
        running.handover = asyncio.create_task(
            self._hand_over(running), name=f"fabric-lease-{running.task.task_id}"
        )

    async def _hand_over(self, running: Running) -> None:
        """Hand a task still running after ``lease_after_s`` over to a lease, before the broker's
        ``consumer_timeout`` closes the channel under it.

        ``started`` with ``lease_s`` is confirmed first, so the router knows the attempt is leased before
        its message is acked; from then on every heartbeat renews the lease.
        """
        worker = self._settings
        task = running.task
        while True:
            running.handing_over = True
            renewed_at = time.monotonic()
            try:
                await self._settle.event(task, EventStatus.STARTED, lease_s=worker.lease_ttl_s)
                break
            except TransportError as exc:
                running.handing_over = False
                log.warning(
                    "could not lease task %s/%s (%s); trying again", task.workflow_id, task.task_id, exc
                )
            await asyncio.sleep(NACK_PAUSE_S)
        running.renewed_at = renewed_at
        running.leased = True
        self.leased += 1
        self._metrics.count("leased", task.capability)
        for copy in running.deliveries:
            await copy.ack()
        running.handing_over = False
        log.info(
            "task %s/%s has run %.0fs: its message is acked; it runs on under a lease of %.0fs",
            task.workflow_id,
            task.task_id,
            worker.lease_after_s,
            worker.lease_ttl_s,
        )

    def held(self, running: Running) -> bool:
        """False once a leased attempt went half its lease without a confirmed renewal: then it is
        given up (its handler cancelled, its outcome dropped) before the router can run it again."""
        if running.forfeited:
            return False
        now = time.monotonic()
        if not lapsing(running.renewed_at, now, self._settings.lease_ttl_s):
            return True
        running.forfeited = True
        task = running.task
        log.warning(
            "task %s/%s attempt %d: lease not renewed for %.0fs; giving the attempt up",
            task.workflow_id,
            task.task_id,
            task.attempt,
            now - running.renewed_at,
        )
        self._execution.give_up(task)
        return False


async def finish_handover(running: Running) -> None:
    """The attempt ended: stop a hand-over still retrying its publish, or let one under way complete."""
    handover = running.handover
    if handover is None:
        return
    if not running.handing_over:
        handover.cancel()
    await asyncio.gather(handover, return_exceptions=True)
