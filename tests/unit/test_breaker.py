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


# Each case: breaker(failure_threshold=1, cooldown_s=5), opened by one failure at t=0; then steps run at
# t=5 (half-open). A step is "probe" (try_probe), "ok"/"fail" (record), "release" (release_probe).
RELEASE_CASES = [
    pytest.param(
        ["probe", "release"], [True, True], BreakerState.HALF_OPEN, True, id="probe-without-outcome"
    ),
    pytest.param(["release"], [False], BreakerState.HALF_OPEN, True, id="nothing-claimed"),
    pytest.param(["probe", "ok", "release"], [True, None, False], BreakerState.CLOSED, False, id="probe-ok"),
    pytest.param(
        ["probe", "fail", "release"], [True, None, False], BreakerState.OPEN, False, id="probe-failed"
    ),
    pytest.param(
        ["probe", "release", "release"], [True, True, False], BreakerState.HALF_OPEN, True, id="twice"
    ),
    pytest.param(
        ["probe", "release", "probe", "fail"],
        [True, True, True, None],
        BreakerState.OPEN,
        False,
        id="next-probe-counts",
    ),
]


@pytest.mark.parametrize(("steps", "returns", "state", "may_probe"), RELEASE_CASES)
def test_release_probe(
    steps: list[str], returns: list[bool | None], state: BreakerState, may_probe: bool
) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record(False)
    clock.now = 5
    got: list[bool | None] = []
    for step in steps:
        if step == "probe":
            got.append(breaker.try_probe())
        elif step == "release":
            got.append(breaker.release_probe())
        else:
            breaker.record(step == "ok")
            got.append(None)
    assert got == returns
    assert breaker.state is state
    assert breaker.try_probe() is may_probe


@pytest.mark.parametrize("state", ["closed", "open"])
def test_release_probe_is_a_no_op_unless_half_open(state: str) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    if state == "open":
        breaker.record(False)
    assert breaker.release_probe() is False
    assert breaker.state == state
