"""What one attempt comes to: a handler's result or exception, judged by the failure policy, as a tagged
:class:`Outcome` the settlement carries out (docs/protocol.md §5).

Pure: no I/O, no clock, no broker. The shell runs the handler and passes in what came of it; these
functions only decide.

Example:
    >>> facts = Attempt(attempt=1, max_attempts=3, capability="demo.echo", on_exhausted=OnExhausted.PARK)
    >>> of_error(KeyError("x"), facts, RetryPolicy()).status
    <EventStatus.RETRYING: 'retrying'>
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

from fabric.errors import Abort, HandlerSignal, ProtocolError, Retry
from fabric.policy import (
    REASON_NO_OTHER_AGENT,
    REASON_WORKER_LOST,
    Action,
    Decision,
    Failure,
    FailurePolicy,
    give_up,
)
from fabric.protocol import codec
from fabric.protocol.messages import ErrorInfo, EventStatus, OnExhausted

#: The error recorded on a task an operator cancelled.
CANCELLED_ERROR = ErrorInfo(type="Cancelled", message="cancelled by an operator")
#: Error types that say nothing about the agent's health (its input's fault, or a decision).
NOT_AGENT_FAULTS = frozenset({"Abort", "Escalate", "ResultNotSerializable", "Cancelled"})

#: The event a worker reports for each decision of the failure policy.
EVENT_OF = {
    Action.RETRY: EventStatus.RETRYING,
    Action.REASSIGN: EventStatus.REASSIGNED,
    Action.FAIL: EventStatus.FAILED,
    Action.ESCALATE: EventStatus.ESCALATED,
    Action.ABORT: EventStatus.DEAD,
}

#: The ``outcome`` label of the task duration histogram, by reported status.
RUN_LABELS = {
    EventStatus.SUCCEEDED: "succeeded",
    EventStatus.CANCELLED: "cancelled",
    EventStatus.FAILED: "failed",
    EventStatus.RETRYING: "failed",
    EventStatus.REASSIGNED: "failed",
    EventStatus.DEAD: "failed",
    EventStatus.ESCALATED: "failed",
    EventStatus.STARTED: "failed",
}


class Origin(enum.Enum):
    """Where an outcome came from: it decides which copy a retry avoids and which counters move."""

    #: This worker ran the handler.
    RAN = "ran"
    #: A redelivered message: another worker lost the attempt (died, or lost its connection).
    LOST = "lost"
    #: The task went round the agents it must avoid too often: nobody else takes it.
    NO_OTHER_AGENT = "no_other_agent"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the policy needs to know of the attempt: its number, its limit, its capability and what
    happens once it is out of attempts (the task message's, else the worker's settings)."""

    attempt: int
    max_attempts: int
    capability: str
    on_exhausted: OnExhausted


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt comes to: the event to report and, for a failure, the policy's decision."""

    status: EventStatus
    result: Any = None
    error: ErrorInfo | None = None
    decision: Decision | None = None
    origin: Origin = Origin.RAN

    @property
    def reason(self) -> str | None:
        """The event's ``reason`` (for ``dead`` and ``escalated``)."""
        return self.decision.reason if self.decision is not None else None

    @property
    def retry_in_s(self) -> float | None:
        """With a retry: seconds until the next attempt runs."""
        decision = self.decision
        if decision is None or decision.action is not Action.RETRY or decision.delay_ms is None:
            return None
        return decision.delay_ms / 1000

    @property
    def counts_for_health(self) -> bool:
        """False for outcomes that say nothing about the agent's health (cancelled, the input's fault)."""
        return self.status is not EventStatus.CANCELLED and not (
            self.error is not None and self.error.type in NOT_AGENT_FAULTS
        )

    @property
    def avoid_self(self) -> bool:
        """A retry prefers another agent, unless who lost the attempt is unknown (not this agent,
        which just received it)."""
        return self.origin is not Origin.LOST


def cancelled() -> Outcome:
    """An attempt an operator cancelled."""
    return Outcome(EventStatus.CANCELLED, error=CANCELLED_ERROR)


def failed(
    error: ErrorInfo, facts: Attempt, policy: FailurePolicy, signal: HandlerSignal | None = None
) -> Outcome:
    """A failed run, as the policy decides (``signal``: the control-flow exception the handler raised)."""
    decision = policy.decide(
        Failure(
            error=error,
            attempt=facts.attempt,
            max_attempts=facts.max_attempts,
            capability=facts.capability,
            signal=type(signal).__name__ if signal is not None else None,
            requested_delay_s=signal.delay_s if isinstance(signal, Retry) else None,
            requested_reason=signal.reason if isinstance(signal, Abort) else None,
            on_exhausted=facts.on_exhausted,
        )
    )
    return Outcome(EVENT_OF[decision.action], error=decision.error, decision=decision)


def error_of(exc: BaseException, *, timeout_s: float | None = None) -> ErrorInfo:
    """The error recorded for what a handler raised; ``timeout_s`` when the attempt's own time limit
    expired (then the exception is the deadline's, not the handler's)."""
    if timeout_s is not None:
        return ErrorInfo(type="TimeoutError", message=f"task exceeded its timeout of {timeout_s:g}s")
    if isinstance(exc, asyncio.CancelledError):
        return ErrorInfo(type="CancelledError", message=str(exc) or "the handler raised CancelledError")
    return ErrorInfo(type=type(exc).__name__, message=str(exc))


def of_error(
    exc: BaseException, facts: Attempt, policy: FailurePolicy, *, timeout_s: float | None = None
) -> Outcome:
    """What a run that raised ``exc`` comes to (see :func:`error_of` for ``timeout_s``)."""
    signal = exc if isinstance(exc, HandlerSignal) and timeout_s is None else None
    return failed(error_of(exc, timeout_s=timeout_s), facts, policy, signal)


def of_result(result: Any, facts: Attempt, policy: FailurePolicy) -> Outcome:
    """What a run that returned ``result`` comes to: success, unless the result cannot travel."""
    problem = unserializable(result)
    if problem is not None:
        return failed(ErrorInfo(type="ResultNotSerializable", message=problem), facts, policy)
    return Outcome(EventStatus.SUCCEEDED, result=result)


def lost(facts: Attempt, policy: FailurePolicy) -> Outcome:
    """A redelivered message: its attempt was lost with the worker that ran it. That counts as an
    attempt, so a task that kills its worker every time is retried, then given up as ``worker_lost``."""
    error = ErrorInfo(
        type="WorkerLost",
        message=f"attempt {facts.attempt} was lost: its worker died or lost the broker connection "
        "while running it",
    )
    decision = policy.decide(
        Failure(
            error=error,
            attempt=facts.attempt,
            max_attempts=facts.max_attempts,
            capability=facts.capability,
            on_exhausted=facts.on_exhausted,
        )
    )
    if decision.action is not Action.RETRY:
        decision = give_up(error, REASON_WORKER_LOST, facts.on_exhausted)
    return Outcome(EVENT_OF[decision.action], error=error, decision=decision, origin=Origin.LOST)


def no_other_agent(avoided: list[str], bounces: int, on_exhausted: OnExhausted) -> Outcome:
    """A task that must avoid ``avoided`` went round ``bounces`` times with no other agent taking it."""
    error = ErrorInfo(
        type="NoOtherAgent",
        message=f"no agent but {', '.join(avoided)} took the task in {bounces} hand-overs",
    )
    decision = give_up(error, REASON_NO_OTHER_AGENT, on_exhausted)
    return Outcome(EVENT_OF[decision.action], error=error, decision=decision, origin=Origin.NO_OTHER_AGENT)


def unserializable(result: Any) -> str | None:
    """Why ``result`` cannot travel to the router intact, or None when it can.

    Encoding alone is not enough: a map with a tuple key encodes (as an array key) but does not decode.
    """
    try:
        codec.decode(codec.encode(result))
    except ProtocolError as exc:
        return (
            f"the handler's result ({type(result).__name__}) cannot be sent as msgpack: {exc}; return "
            "None, bool, numbers, str, bytes, lists and dicts with str or int keys"
        )
    return None
