"""Circuit breaker: a pure state machine, one per agent per capability. Clock injected; no I/O.

``closed`` (tasks flow) → ``open`` after ``failure_threshold`` failures in a row: the worker stops
consuming the capability, so other agents take the work → ``half_open`` once ``cooldown_s`` has
passed: exactly one probe task is let through → ``closed`` if it succeeds, ``open`` again (a new
cool-down) if it fails. A probe that ends without an outcome (handed back unstarted, malformed,
cancelled, aborted) is released, so the next task may probe: half-open never waits on nothing.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts an agent's consecutive failures on one capability and says whether it may take work.

    Example:
        >>> breaker = CircuitBreaker(failure_threshold=2, cooldown_s=30, clock=lambda: 0.0)
        >>> breaker.record(False); breaker.record(False); breaker.state
        <BreakerState.OPEN: 'open'>
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooldown_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s > 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down has passed reads ``half_open``)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        return self._state

    def seconds_until_probe(self) -> float:
        """While open: how long until a probe may run (0 when it may run now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def try_probe(self) -> bool:
        """In ``half_open``: claim the one probe (False if one runs already, or not half-open)."""
        if self.state is not BreakerState.HALF_OPEN or self._probing:
            return False
        self._probing = True
        return True

    def release_probe(self) -> bool:
        """The probe claimed with :meth:`try_probe` ended without a recorded outcome: let another probe.

        A no-op unless a probe is claimed and the breaker is still half-open (a recorded outcome
        already closed or reopened it). Returns True when a claim was released.

        Example:
            >>> if breaker.try_probe():
            ...     try:
            ...         await run(task)  # may hand the task back without an outcome
            ...     finally:
            ...         breaker.release_probe()
        """
        if self.state is not BreakerState.HALF_OPEN or not self._probing:
            return False
        self._probing = False
        return True

    def record(self, success: bool) -> BreakerState:
        """Count an attempt's outcome; returns the state after it.

        While open, outcomes are ignored: they are tasks taken before it opened, not a probe.
        """
        state = self.state
        if state is BreakerState.OPEN:
            return state
        if success:
            self._failures = 0
            self._state, self._probing = BreakerState.CLOSED, False
        elif state is BreakerState.HALF_OPEN:
            self._trip()
        else:
            self._failures += 1
            if state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
                self._trip()
        return self._state

    def _trip(self) -> None:
        self._state, self._probing = BreakerState.OPEN, False
        self._opened_at = self._clock()
        self._failures = 0
