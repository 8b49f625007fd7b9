"""Failure policy: pure decisions about a failed attempt. No I/O, no clock, randomness injected.

The worker asks :meth:`FailurePolicy.decide` what to do with every failed attempt (handler error,
timeout, explicit signal) and carries the decision out:

* ``retry``: the task message goes to ``{ns}.retry`` with header ``fabric-delay: <tier>`` and waits in
  ``{ns}.delay.<tier>`` until its TTL dead-letters it back to its capability queue, attempt + 1. No
  delay is ever held in a fabric process.
* ``abort``: the task message is parked on ``{ns}.dead`` with the reason; the task ends ``dead``.
* ``escalate``: the task stops and waits for an operator (state ``escalated``, an alert on
  ``{ns}.alerts``) who resumes it (``fabric resume``) or aborts it (``fabric abort``).
* ``fail``: the task ends ``failed`` at once (:class:`FailFast`, for tests and for callers that want
  no retries).

:class:`RetryPolicy` is the default: unknown errors and timeouts retry with exponential backoff on the
delay tiers (1s, 5s, 30s, 2m, 10m, 1h) until ``max_attempts``, then park as ``exhausted`` (or, when
the task's ``on_exhausted`` is ``escalate``, escalate). :func:`give_up` is that last step on its own,
for the worker's other ways of running out (no other agent, a worker lost on every attempt).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fabric.protocol.messages import ErrorInfo, OnExhausted

#: Delay tiers (name -> milliseconds), shortest first; the same as the ``{ns}.delay.<tier>`` queues.
DEFAULT_TIERS_MS: Mapping[str, int] = {
    "1s": 1_000,
    "5s": 5_000,
    "30s": 30_000,
    "2m": 120_000,
    "10m": 600_000,
    "1h": 3_600_000,
}


#: Error types a retry cannot fix: the same input gives the same failure.
NOT_RETRIED = frozenset({"ResultNotSerializable"})

#: Reason of an escalation a handler asked for (``raise Escalate(...)``).
REASON_REQUESTED = "requested"
#: Reason when ``max_attempts`` attempts failed.
REASON_EXHAUSTED = "exhausted"
#: Reason when no agent but those to avoid took a reassigned task.
REASON_NO_OTHER_AGENT = "no_other_agent"
#: Reason when the task's worker died (or lost the broker) on its last attempt.
REASON_WORKER_LOST = "worker_lost"


class Action(enum.StrEnum):
    """What happens to a failed attempt."""

    FAIL = "fail"
    RETRY = "retry"
    REASSIGN = "reassign"
    ESCALATE = "escalate"
    ABORT = "abort"


@dataclass(frozen=True)
class Decision:
    """The policy's verdict on a failed attempt.

    Attributes:
        action: what to do.
        error: the error to record.
        tier: with ``retry``, the delay tier (queue) the message waits in.
        delay_ms: with ``retry``, the message's own expiration inside that tier (jittered, never above
            the tier's TTL, so it never waits behind a longer message).
        reason: with ``abort``, why (the ``fabric-dead-reason`` header); with ``escalate``, why
            (:data:`REASON_REQUESTED`, :data:`REASON_EXHAUSTED`, ...).
    """

    action: Action
    error: ErrorInfo
    tier: str | None = None
    delay_ms: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Failure:
    """A failed attempt as the policy sees it."""

    error: ErrorInfo
    attempt: int
    max_attempts: int
    capability: str
    #: The control-flow signal the handler raised (``Retry``, ``Abort``...), by class name, if any.
    signal: str | None = None
    #: ``Retry(delay_s=...)``: the delay the handler asked for.
    requested_delay_s: float | None = None
    #: ``Abort(reason)``: the reason the handler gave.
    requested_reason: str | None = None
    #: What to do once out of attempts (the task's ``on_exhausted``, else the settings').
    on_exhausted: OnExhausted = OnExhausted.PARK


def give_up(error: ErrorInfo, reason: str, on_exhausted: OnExhausted) -> Decision:
    """The decision when a task has run out (of attempts, of other agents...): park it on ``{ns}.dead``
    with ``reason``, or escalate it to an operator with ``reason``, as ``on_exhausted`` says.

    Example:
        >>> give_up(ErrorInfo(type="E", message="m"), "exhausted", OnExhausted.ESCALATE).action
        <Action.ESCALATE: 'escalate'>
    """
    if on_exhausted is OnExhausted.ESCALATE:
        return Decision(Action.ESCALATE, error, reason=reason)
    return Decision(Action.ABORT, error, reason=reason)


class FailurePolicy(Protocol):
    def decide(self, failure: Failure) -> Decision: ...


class FailFast:
    """Every failure ends the task as ``failed`` with its error recorded."""

    def decide(self, failure: Failure) -> Decision:
        return Decision(Action.FAIL, failure.error)


class RetryPolicy:
    """Retry with exponential backoff on the delay tiers until ``max_attempts``, then park.

    The n-th retry waits in the n-th tier (1s, 5s, 30s, 2m, 10m, then 1h for every later one), each
    message expiring after a random ``(1 - jitter)`` to ``1`` of its tier so that retries of many tasks
    failing together spread out. ``Retry(delay_s=...)`` picks the shortest tier at least that long.
    ``Abort(reason)`` parks at once. ``Reassign`` runs the next attempt at once on another agent.
    ``Escalate`` hands the task to an operator at once. Out of attempts, the task is parked or escalated
    as its ``on_exhausted`` says (:func:`give_up`). Every retry prefers another agent (the failing one
    joins ``fabric-avoid``).

    Args:
        tiers_ms: delay tiers, shortest first.
        jitter: fraction of a tier the expiration may be shortened by (0..0.5).
        random_fraction: a source of numbers in [0, 1), injected for tests.

    Example:
        >>> policy = RetryPolicy(random_fraction=lambda: 0.0)
        >>> policy.decide(Failure(ErrorInfo(type="E", message="m"), 1, 3, "cap")).tier
        '1s'
    """

    def __init__(
        self,
        tiers_ms: Mapping[str, int] = DEFAULT_TIERS_MS,
        *,
        jitter: float = 0.2,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        if not tiers_ms:
            raise ValueError("RetryPolicy needs at least one delay tier")
        if not 0 <= jitter <= 0.5:
            raise ValueError("jitter must be between 0 and 0.5")
        self._tiers = sorted(tiers_ms.items(), key=lambda item: item[1])
        self._jitter = jitter
        self._random = random_fraction

    def decide(self, failure: Failure) -> Decision:
        if failure.signal == "Abort":
            return Decision(Action.ABORT, failure.error, reason=failure.requested_reason or "aborted")
        if failure.error.type in NOT_RETRIED:
            return Decision(Action.ABORT, failure.error, reason="not_retryable")
        if failure.signal == "Escalate":
            return Decision(Action.ESCALATE, failure.error, reason=REASON_REQUESTED)
        if failure.attempt >= failure.max_attempts:
            return give_up(failure.error, REASON_EXHAUSTED, failure.on_exhausted)
        if failure.signal == "Reassign":
            return Decision(Action.REASSIGN, failure.error)
        if failure.signal == "Retry" and failure.requested_delay_s is not None:
            name, ttl_ms = self._tier_at_least(failure.requested_delay_s * 1000)
        else:
            name, ttl_ms = self._tiers[min(failure.attempt, len(self._tiers)) - 1]
        delay_ms = max(1, round(ttl_ms * (1 - self._jitter * self._random())))
        return Decision(Action.RETRY, failure.error, tier=name, delay_ms=delay_ms)

    def _tier_at_least(self, delay_ms: float) -> tuple[str, int]:
        for name, ttl_ms in self._tiers:
            if ttl_ms >= delay_ms:
                return name, ttl_ms
        return self._tiers[-1]
