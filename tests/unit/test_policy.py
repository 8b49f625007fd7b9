"""The failure policy is a pure function of the failed attempt."""

from __future__ import annotations

import pytest

from fabric.policy import DEFAULT_TIERS_MS, Action, FailFast, Failure, RetryPolicy
from fabric.protocol.messages import ErrorInfo

ERROR = ErrorInfo(type="RuntimeError", message="boom")


def failure(attempt: int, max_attempts: int = 10, **kwargs: object) -> Failure:
    return Failure(error=ERROR, attempt=attempt, max_attempts=max_attempts, capability="cap", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attempt", "tier"), [(1, "1s"), (2, "5s"), (3, "30s"), (4, "2m"), (5, "10m"), (6, "1h"), (9, "1h")]
)
def test_each_retry_waits_in_the_next_tier(attempt: int, tier: str) -> None:
    decision = RetryPolicy(random_fraction=lambda: 0.0).decide(failure(attempt))
    assert decision.action is Action.RETRY
    assert decision.tier == tier
    assert decision.delay_ms == DEFAULT_TIERS_MS[tier]
    assert decision.error == ERROR


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_jitter_shortens_within_the_tier_never_beyond(fraction: float) -> None:
    decision = RetryPolicy(jitter=0.2, random_fraction=lambda: fraction).decide(failure(2))
    assert decision.delay_ms is not None
    assert 4_000 <= decision.delay_ms <= 5_000


def test_out_of_attempts_is_parked_as_exhausted() -> None:
    decision = RetryPolicy().decide(failure(3, max_attempts=3))
    assert (decision.action, decision.reason) == (Action.ABORT, "exhausted")
    assert RetryPolicy().decide(failure(1, max_attempts=1)).action is Action.ABORT


def test_abort_parks_at_once_with_the_handlers_reason() -> None:
    decision = RetryPolicy().decide(failure(1, signal="Abort", requested_reason="bad input"))
    assert (decision.action, decision.reason) == (Action.ABORT, "bad input")


@pytest.mark.parametrize(("delay_s", "tier"), [(0.1, "1s"), (1, "1s"), (2, "5s"), (31, "2m"), (99999, "1h")])
def test_retry_signal_picks_the_shortest_tier_at_least_that_long(delay_s: float, tier: str) -> None:
    decision = RetryPolicy().decide(failure(1, signal="Retry", requested_delay_s=delay_s))
    assert (decision.action, decision.tier) == (Action.RETRY, tier)


def test_a_result_that_cannot_travel_is_not_retried() -> None:
    error = ErrorInfo(type="ResultNotSerializable", message="tuple key")
    decision = RetryPolicy().decide(Failure(error=error, attempt=1, max_attempts=5, capability="cap"))
    assert (decision.action, decision.reason) == (Action.ABORT, "not_retryable")


def test_fail_fast_fails() -> None:
    assert FailFast().decide(failure(1)).action is Action.FAIL


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="tier"):
        RetryPolicy({})
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=0.9)
