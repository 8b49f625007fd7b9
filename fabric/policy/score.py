"""Agent scoring: a pure function from an agent's recent record on one capability to the consumer
priority (``x-priority``) it consumes that capability's queue with. No I/O; time is passed in.

RabbitMQ gives a queue's messages to its highest-priority consumers first and moves down to lower
ones only while the higher ones are blocked (their prefetch is full). So a healthier agent that has
room takes the work first; a poorer one gets the rest. The formula::

    health   = success_rate ** 2                # 1.0 with no record yet; 0.9 -> 0.81, 0.5 -> 0.25
    speed    = ref / (ref + latency_s)          # 1.0 with no record yet; latency == ref -> 0.5
    idle     = 1 - load / 2                     # load = busy slots / concurrency, 0..1 -> 1.0..0.5
    raw      = MIN_SCORE + (MAX_SCORE - MIN_SCORE) * health * speed * idle   # 1.0 .. 10.0
    score    = floor(raw + 0.5)                 # 1 .. 10

Each factor is in [0, 1] and moves one way with its input, so the score never goes up when the success
rate falls, the latency grows or the load grows (the unit tests check this with hypothesis). Failures
weigh most (squared): a failing agent sinks to the bottom whatever its speed. ``ref`` is
``FABRIC_WORKER__SCORE_LATENCY_REF_S``: set it to a typical latency of your handlers; only the order of
the agents on one queue matters, so the exact value is not critical.

:class:`RecentOutcomes` keeps the record the score is computed from: the last attempts of one
capability in a time window, with a prior of two successes, so one failure of a fresh agent does not
sink it. :func:`rebucket` adds hysteresis, so a score hovering between two values does not make the
worker re-subscribe (basic.cancel + basic.consume) over and over.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

#: Lowest score (consumer priority) an agent consumes with. Consumers without ``x-priority`` have 0,
#: so a fabric agent, however poor, still ranks above a consumer that set none.
MIN_SCORE = 1
#: Highest score: an agent with a clean record and nothing running.
MAX_SCORE = 10
#: Default latency reference: a handler this slow halves the speed factor.
DEFAULT_LATENCY_REF_S = 5.0
#: How far (in score units) past the edge of the current bucket the raw score must move before the
#: score changes: with 0.25 a score of 7 holds for raw scores from 6.25 to 7.75.
HYSTERESIS = 0.25
#: Virtual successes every record starts with (a Bayesian prior): 1 failure of 1 reads as 2/3.
PRIOR_SUCCESSES = 2


def _check(name: str, value: float, low: float, high: float | None = None) -> None:
    if math.isnan(value) or value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def raw_score(
    success_rate: float | None,
    latency_s: float | None,
    load: float,
    *,
    latency_ref_s: float = DEFAULT_LATENCY_REF_S,
) -> float:
    """The score before rounding, from ``MIN_SCORE`` to ``MAX_SCORE`` (see the module docstring).

    Args:
        success_rate: share of recent attempts that succeeded, 0..1; None when there is no record.
        latency_s: typical duration of recent successful attempts; None when there is none.
        load: busy slots / concurrency; values above 1 (over-committed) count as 1.
        latency_ref_s: the latency that halves the speed factor.

    Raises:
        ValueError: an input is out of its range or NaN; the message names it.

    Example:
        >>> raw_score(1.0, 0.0, 0.0)
        10.0
    """
    _check("latency_ref_s", latency_ref_s, 0.0)
    if latency_ref_s == 0:
        raise ValueError("latency_ref_s must be > 0, got 0")
    _check("load", load, 0.0)
    health = 1.0
    if success_rate is not None:
        _check("success_rate", success_rate, 0.0, 1.0)
        health = success_rate * success_rate
    speed = 1.0
    if latency_s is not None:
        _check("latency_s", latency_s, 0.0)
        speed = latency_ref_s / (latency_ref_s + latency_s) if math.isfinite(latency_s) else 0.0
    idle = 1.0 - min(load, 1.0) / 2
    return MIN_SCORE + (MAX_SCORE - MIN_SCORE) * health * speed * idle


def score(
    success_rate: float | None,
    latency_s: float | None,
    load: float,
    *,
    latency_ref_s: float = DEFAULT_LATENCY_REF_S,
) -> int:
    """The consumer priority for this record: :func:`raw_score` rounded half up, ``MIN_SCORE`` to
    ``MAX_SCORE``. Never higher for a lower success rate, a higher latency or a higher load.

    Raises:
        ValueError: an input is out of its range or NaN.

    Example:
        >>> score(1.0, None, 0.0), score(0.5, None, 0.0), score(1.0, 5.0, 1.0)
        (10, 3, 3)
    """
    return math.floor(raw_score(success_rate, latency_s, load, latency_ref_s=latency_ref_s) + 0.5)


def rebucket(raw: float, current: int, *, margin: float = HYSTERESIS) -> int:
    """The score to use now, given the raw score and the score in use: ``current`` while ``raw`` stays
    within ``margin`` of its bucket (``current ± 0.5``), else ``raw`` rounded.

    Example:
        >>> rebucket(7.6, 7), rebucket(7.8, 7), rebucket(6.3, 7)
        (7, 8, 7)
    """
    if current - 0.5 - margin <= raw <= current + 0.5 + margin:
        return current
    return min(MAX_SCORE, max(MIN_SCORE, math.floor(raw + 0.5)))


@dataclass(frozen=True, slots=True)
class Record:
    """What :class:`RecentOutcomes` reports: the inputs of :func:`score` for one capability."""

    attempts: int
    successes: int
    #: Smoothed success rate (with the prior); None when there were no attempts in the window.
    success_rate: float | None
    #: Mean duration of the successful attempts in the window; None when there were none.
    latency_s: float | None


class RecentOutcomes:
    """The last ``size`` attempt outcomes of one capability within ``window_s``; times passed in.

    Example:
        >>> recent = RecentOutcomes(size=10, window_s=60)
        >>> recent.add(0.0, ok=False, duration_s=0.1)
        >>> recent.record(1.0).success_rate
        0.6666666666666666
    """

    def __init__(self, *, size: int = 100, window_s: float = 300.0) -> None:
        if size < 1 or not window_s > 0:
            raise ValueError("size must be >= 1 and window_s > 0")
        self.window_s = window_s
        self._outcomes: deque[tuple[float, bool, float]] = deque(maxlen=size)

    def add(self, at: float, *, ok: bool, duration_s: float) -> None:
        """Record one attempt that ended at ``at`` after ``duration_s``."""
        self._outcomes.append((at, ok, max(0.0, duration_s)))

    def record(self, now: float) -> Record:
        """The record as of ``now`` (attempts older than the window are forgotten)."""
        while self._outcomes and self._outcomes[0][0] < now - self.window_s:
            self._outcomes.popleft()
        attempts = len(self._outcomes)
        durations = [d for _, ok, d in self._outcomes if ok]
        successes = len(durations)
        return Record(
            attempts=attempts,
            successes=successes,
            success_rate=(successes + PRIOR_SUCCESSES) / (attempts + PRIOR_SUCCESSES) if attempts else None,
            latency_s=sum(durations) / successes if successes else None,
        )
