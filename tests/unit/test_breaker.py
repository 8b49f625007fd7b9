"""The circuit breaker state machine, on a fake clock."""

from __future__ import annotations

import pytest

from fabric.policy.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_the_threshold_of_failures_in_a_row() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    assert breaker.record(False) is BreakerState.CLOSED
    assert breaker.record(True) is BreakerState.CLOSED, "a success resets the count"
    for _ in range(2):
        assert breaker.record(False) is BreakerState.CLOSED
    assert breaker.record(False) is BreakerState.OPEN
    assert breaker.seconds_until_probe() == 10


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record(False)
    clock.now = 4.9
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_probe()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_probe()
    assert not breaker.try_probe(), "exactly one probe"


def test_probe_success_closes_and_failure_reopens_with_a_new_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record(False)
    clock.now = 5
    assert breaker.try_probe()
    assert breaker.record(False) is BreakerState.OPEN
    clock.now = 9
    assert breaker.state is BreakerState.OPEN, "the cool-down starts again"
    clock.now = 10
    assert breaker.try_probe()
    assert breaker.record(True) is BreakerState.CLOSED


def test_outcomes_while_open_are_ignored() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record(False)
    assert breaker.record(True) is BreakerState.OPEN, "a task taken before it opened is no probe"


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
