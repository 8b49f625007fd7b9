"""The attempts book: the attempts this worker holds, from their delivery until they are settled, and
the ones it has reported (bounded), so another copy of either is never run a second time.

A copy arrives again when the broker closed the consumer channel under a running task
(``consumer_timeout``, a dropped connection) and requeued its message, or a router republished it.

Example:
    >>> book = AttemptsBook()
    >>> book.hold(Running(task, [delivery]))
    >>> book.held(("wf", "a", 1)) is not None
    True
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from fabric.transport.amqp import Delivery
from fabric.worker.agent import Task

#: An attempt's identity: (workflow id, task id, attempt).
AttemptKey = tuple[str, str, int]

#: Reported attempts a worker remembers, to ack copies of them delivered again.
MAX_REPORTED = 10_000


def key_of(task: Task) -> AttemptKey:
    """The identity of ``task``'s attempt."""
    return (task.workflow_id, task.task_id, task.attempt)


@dataclass(slots=True, eq=False)
class Running:
    """One attempt this worker holds, from its delivery until it is settled."""

    task: Task
    #: The delivery that runs, then any copies delivered again meanwhile: all are settled together.
    deliveries: list[Delivery]
    #: True once the messages are acked and the attempt runs under a lease the router holds.
    leased: bool = False
    #: Publishing the lease and acking: the hand-over must not be interrupted then.
    handing_over: bool = False
    #: time.monotonic() of the last confirmed renewal (the lease itself, then heartbeats).
    renewed_at: float = 0.0
    #: Given up: the lease went unrenewed too long; nothing of this attempt is reported.
    forfeited: bool = False
    #: The hand-over to a lease, once ``lease_after_s`` has passed.
    handover: asyncio.Task[None] | None = None


class AttemptsBook:
    """Attempts held here by key, and the keys of the last :data:`MAX_REPORTED` attempts reported."""

    def __init__(self, max_reported: int = MAX_REPORTED) -> None:
        self._held: dict[AttemptKey, Running] = {}
        self._reported: OrderedDict[AttemptKey, None] = OrderedDict()
        self._max_reported = max_reported

    def held(self, key: AttemptKey) -> Running | None:
        """The attempt ``key`` if this worker holds it now."""
        return self._held.get(key)

    def was_reported(self, key: AttemptKey, *, redelivered: bool) -> bool:
        """Whether a delivery of ``key`` is a copy of an attempt reported here.

        Only a redelivered copy counts: a replayed task (``fabric dead replay``) starts again from
        attempt 1.
        """
        return redelivered and key in self._reported

    def hold(self, running: Running) -> None:
        self._held[key_of(running.task)] = running

    def release(self, running: Running) -> None:
        del self._held[key_of(running.task)]

    def reported(self, task: Task) -> None:
        """``task``'s attempt was reported: a copy of it delivered again is only acked."""
        self._reported[key_of(task)] = None
        while len(self._reported) > self._max_reported:
            self._reported.popitem(last=False)

    def leased(self) -> list[Running]:
        """The attempts held here that run under a lease."""
        return [running for running in self._held.values() if running.leased]
