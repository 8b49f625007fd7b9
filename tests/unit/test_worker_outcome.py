"""What an attempt comes to (fabric.worker.outcome), without a broker: result or exception + policy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabric.errors import Abort, Escalate, Reassign, Retry
from fabric.policy import FailFast, RetryPolicy
from fabric.protocol.messages import ErrorInfo, EventStatus, OnExhausted
from fabric.worker import outcome
from fabric.worker.outcome import Attempt, Origin, Outcome
from fabric.worker.settlement import counters

POLICY = RetryPolicy(random_fraction=lambda: 0.0)


def facts(attempt: int = 1, max_attempts: int = 3, on_exhausted: OnExhausted = OnExhausted.PARK) -> Attempt:
    return Attempt(attempt=attempt, max_attempts=max_attempts, capability="c", on_exhausted=on_exhausted)


@pytest.mark.parametrize(
    ("exc", "attempt", "on_exhausted", "status", "error_type", "reason", "tier"),
    [
        (KeyError("x"), 1, OnExhausted.PARK, EventStatus.RETRYING, "KeyError", None, "1s"),
        (ValueError("bad"), 2, OnExhausted.PARK, EventStatus.RETRYING, "ValueError", None, "5s"),
        (ValueError("bad"), 3, OnExhausted.PARK, EventStatus.DEAD, "ValueError", "exhausted", None),
        (ValueError("bad"), 3, OnExhausted.ESCALATE, EventStatus.ESCALATED, "ValueError", "exhausted", None),
        (Retry(delay_s=20), 1, OnExhausted.PARK, EventStatus.RETRYING, "Retry", None, "30s"),
        (Retry(), 3, OnExhausted.PARK, EventStatus.DEAD, "Retry", "exhausted", None),
        (Abort("no_input"), 1, OnExhausted.PARK, EventStatus.DEAD, "Abort", "no_input", None),
        (Escalate("look"), 1, OnExhausted.PARK, EventStatus.ESCALATED, "Escalate", "requested", None),
        (Reassign(), 1, OnExhausted.PARK, EventStatus.REASSIGNED, "Reassign", None, None),
        (Reassign(), 3, OnExhausted.PARK, EventStatus.DEAD, "Reassign", "exhausted", None),
        (asyncio.CancelledError(), 1, OnExhausted.PARK, EventStatus.RETRYING, "CancelledError", None, "1s"),
        (
            TimeoutError("a call timed out"),
            1,
            OnExhausted.PARK,
            EventStatus.RETRYING,
            "TimeoutError",
            None,
            "1s",
        ),
    ],
)
def test_an_exception_and_the_policy_decide_the_outcome(
    exc: BaseException,
    attempt: int,
    on_exhausted: OnExhausted,
    status: EventStatus,
    error_type: str,
    reason: str | None,
    tier: str | None,
) -> None:
    result = outcome.of_error(exc, facts(attempt, on_exhausted=on_exhausted), POLICY)
    assert result.status is status
    assert result.error is not None
    assert result.error.type == error_type
    assert result.reason == reason
    assert result.decision is not None
    assert result.decision.tier == tier
    assert result.origin is Origin.RAN
    assert result.avoid_self


@pytest.mark.parametrize(
    ("exc", "timeout_s", "expected"),
    [
        (TimeoutError(), 2.5, ErrorInfo(type="TimeoutError", message="task exceeded its timeout of 2.5s")),
        (TimeoutError("x"), None, ErrorInfo(type="TimeoutError", message="x")),
        (
            asyncio.CancelledError(),
            None,
            ErrorInfo(type="CancelledError", message="the handler raised CancelledError"),
        ),
        (asyncio.CancelledError("stop"), None, ErrorInfo(type="CancelledError", message="stop")),
        (KeyError("k"), None, ErrorInfo(type="KeyError", message="'k'")),
        (Abort("why"), None, ErrorInfo(type="Abort", message="why")),
    ],
)
def test_the_error_recorded_for_what_a_handler_raised(
    exc: BaseException, timeout_s: float | None, expected: ErrorInfo
) -> None:
    assert outcome.error_of(exc, timeout_s=timeout_s) == expected


def test_an_expired_time_limit_is_no_signal_of_the_handler() -> None:
    # The deadline's TimeoutError, whatever the exception object: never taken for an Abort.
    result = outcome.of_error(Abort("x"), facts(), POLICY, timeout_s=1.0)
    assert result.error == ErrorInfo(type="TimeoutError", message="task exceeded its timeout of 1s")
    assert result.status is EventStatus.RETRYING


@pytest.mark.parametrize(
    ("value", "status", "error_type"),
    [
        ({"a": [1, 2.5, "x", b"y", None, True]}, EventStatus.SUCCEEDED, None),
        ({1: "int keys travel"}, EventStatus.SUCCEEDED, None),
        ({(1, 2): "tuple key"}, EventStatus.DEAD, "ResultNotSerializable"),
        (object(), EventStatus.DEAD, "ResultNotSerializable"),
    ],
)
def test_a_result_succeeds_unless_it_cannot_travel(
    value: Any, status: EventStatus, error_type: str | None
) -> None:
    result = outcome.of_result(value, facts(), POLICY)
    assert result.status is status
    assert (result.error.type if result.error else None) == error_type
    if status is EventStatus.SUCCEEDED:
        assert result.result == value
        assert result.counts_for_health


@pytest.mark.parametrize(
    ("attempt", "on_exhausted", "status", "reason"),
    [
        (1, OnExhausted.PARK, EventStatus.RETRYING, None),
        (3, OnExhausted.PARK, EventStatus.DEAD, "worker_lost"),
        (3, OnExhausted.ESCALATE, EventStatus.ESCALATED, "worker_lost"),
    ],
)
def test_a_lost_attempt_is_retried_then_given_up_as_worker_lost(
    attempt: int, on_exhausted: OnExhausted, status: EventStatus, reason: str | None
) -> None:
    result = outcome.lost(facts(attempt, on_exhausted=on_exhausted), POLICY)
    assert (result.status, result.reason, result.origin) == (status, reason, Origin.LOST)
    assert result.error is not None
    assert result.error.type == "WorkerLost"
    assert not result.avoid_self, "who lost the attempt is unknown: nobody new is avoided"


def test_a_lost_attempt_under_a_policy_that_never_retries_is_given_up() -> None:
    result = outcome.lost(facts(), FailFast())
    assert (result.status, result.reason) == (EventStatus.DEAD, "worker_lost")


@pytest.mark.parametrize(
    ("on_exhausted", "status"),
    [(OnExhausted.PARK, EventStatus.DEAD), (OnExhausted.ESCALATE, EventStatus.ESCALATED)],
)
def test_no_other_agent(on_exhausted: OnExhausted, status: EventStatus) -> None:
    result = outcome.no_other_agent(["a@h:1", "b@h:2"], 20, on_exhausted)
    assert (result.status, result.reason) == (status, "no_other_agent")
    assert result.error == ErrorInfo(
        type="NoOtherAgent", message="no agent but a@h:1, b@h:2 took the task in 20 hand-overs"
    )


@pytest.mark.parametrize(
    ("result", "health", "retry_in_s", "moved"),
    [
        (Outcome(EventStatus.SUCCEEDED, result=1), True, None, ["succeeded"]),
        (outcome.cancelled(), False, None, []),
        (outcome.of_error(KeyError("k"), facts(), POLICY), True, 1.0, ["failed", "retried"]),
        (outcome.of_error(Reassign(), facts(), POLICY), True, None, ["failed", "retried"]),
        (outcome.of_error(Abort("x"), facts(), POLICY), False, None, ["failed", "parked"]),
        (outcome.of_error(Escalate(), facts(), POLICY), False, None, ["failed", "escalated"]),
        (outcome.of_error(KeyError("k"), facts(), FailFast()), True, None, ["failed"]),
        (outcome.of_result(object(), facts(), POLICY), False, None, ["failed", "parked"]),
        (outcome.lost(facts(), POLICY), True, 1.0, ["retried"]),
        (outcome.lost(facts(3), POLICY), True, None, ["parked"]),
        (outcome.lost(facts(3, on_exhausted=OnExhausted.ESCALATE), POLICY), True, None, ["escalated"]),
        (outcome.no_other_agent(["a"], 20, OnExhausted.PARK), True, None, ["parked"]),
        (outcome.no_other_agent(["a"], 20, OnExhausted.ESCALATE), True, None, ["escalated"]),
    ],
)
def test_what_an_outcome_counts_for(
    result: Outcome, health: bool, retry_in_s: float | None, moved: list[str]
) -> None:
    assert result.counts_for_health is health
    assert result.retry_in_s == retry_in_s
    assert counters(result) == moved
