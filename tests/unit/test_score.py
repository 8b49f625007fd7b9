"""Agent scoring: the formula, its range, its monotonicity (hypothesis), hysteresis, the recent record."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.policy.score import (
    MAX_SCORE,
    MIN_SCORE,
    RecentOutcomes,
    raw_score,
    rebucket,
    score,
)

rates = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))
latencies = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e6))
loads = st.floats(min_value=0.0, max_value=3.0)
refs = st.floats(min_value=0.01, max_value=1000.0)


def _ordered(a: float, b: float) -> tuple[float, float]:
    return (a, b) if a <= b else (b, a)


@given(rates, latencies, loads, refs)
def test_always_in_range(rate: float | None, latency: float | None, load: float, ref: float) -> None:
    value = score(rate, latency, load, latency_ref_s=ref)
    assert MIN_SCORE <= value <= MAX_SCORE
    assert MIN_SCORE <= raw_score(rate, latency, load, latency_ref_s=ref) <= MAX_SCORE


@given(st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1.0), latencies, loads)
def test_better_success_never_lowers_the_score(
    a: float, b: float, latency: float | None, load: float
) -> None:
    worse, better = _ordered(a, b)
    assert score(worse, latency, load) <= score(better, latency, load)


@given(rates, st.floats(min_value=0.0, max_value=1e6), st.floats(min_value=0.0, max_value=1e6), loads)
def test_higher_latency_never_raises_the_score(rate: float | None, a: float, b: float, load: float) -> None:
    fast, slow = _ordered(a, b)
    assert score(rate, slow, load) <= score(rate, fast, load)


@given(rates, latencies, loads, loads)
def test_higher_load_never_raises_the_score(
    rate: float | None, latency: float | None, a: float, b: float
) -> None:
    light, heavy = _ordered(a, b)
    assert score(rate, latency, heavy) <= score(rate, latency, light)


@given(latencies, loads)
def test_no_record_scores_as_a_perfect_record(latency: float | None, load: float) -> None:
    assert score(None, latency, load) == score(1.0, latency, load)
    assert score(1.0, None, load) == score(1.0, 0.0, load)


def test_the_documented_points() -> None:
    assert score(1.0, 0.0, 0.0) == MAX_SCORE
    assert score(0.0, 0.0, 0.0) == MIN_SCORE, "a failing agent sinks to the bottom"
    assert score(0.0, None, 0.0) == MIN_SCORE
    assert score(1.0, None, 1.0) == 6, "fully loaded: 1 + 9 * 0.5 = 5.5, rounded half up"
    assert score(0.9, None, 0.0) == 8, "1 + 9 * 0.81 = 8.29"
    assert score(0.5, None, 0.0) == 3, "1 + 9 * 0.25 = 3.25"
    assert score(1.0, 5.0, 0.0, latency_ref_s=5.0) == 6, "latency == ref halves the speed factor"
    assert score(1.0, 5.0, 2.0, latency_ref_s=5.0) == score(1.0, 5.0, 1.0, latency_ref_s=5.0)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((1.5, None, 0.0), "success_rate"),
        ((-0.1, None, 0.0), "success_rate"),
        ((math.nan, None, 0.0), "success_rate"),
        ((1.0, -1.0, 0.0), "latency_s"),
        ((1.0, math.nan, 0.0), "latency_s"),
        ((1.0, None, -0.5), "load"),
        ((1.0, None, math.nan), "load"),
    ],
)
def test_bad_input_is_a_clear_error(args: tuple[float | None, float | None, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        score(*args)
    with pytest.raises(ValueError, match="latency_ref_s"):
        score(1.0, None, 0.0, latency_ref_s=0.0)


@given(st.floats(min_value=MIN_SCORE, max_value=MAX_SCORE), st.integers(MIN_SCORE, MAX_SCORE))
def test_rebucket_keeps_the_score_inside_its_band_and_follows_outside(raw: float, current: int) -> None:
    new = rebucket(raw, current)
    assert MIN_SCORE <= new <= MAX_SCORE
    if abs(raw - current) <= 0.75:
        assert new == current, "inside the band: no change, no re-subscribe"
    else:
        assert new == math.floor(raw + 0.5), "outside the band: the rounded raw score"


def test_rebucket_does_not_flap_around_a_boundary() -> None:
    current = 7
    changes = 0
    for raw in [7.45, 7.55, 7.48, 7.6, 7.52, 7.7, 7.44] * 10:  # hovering around 7.5
        new = rebucket(raw, current)
        changes += new != current
        current = new
    assert changes == 0


def test_recent_outcomes_smooth_with_a_prior_and_forget_old_attempts() -> None:
    recent = RecentOutcomes(size=5, window_s=60)
    assert recent.record(0.0).success_rate is None
    recent.add(0.0, ok=False, duration_s=1.0)
    assert recent.record(0.0).success_rate == pytest.approx(2 / 3), "one failure of a fresh agent"
    for i in range(6):
        recent.add(float(i), ok=True, duration_s=0.5)
    record = recent.record(10.0)
    assert record.attempts == 5, "bounded to the last 5"
    assert record.successes == 5
    assert record.latency_s == pytest.approx(0.5)
    assert recent.record(100.0).attempts == 0, "older than the window: forgotten"
    with pytest.raises(ValueError):
        RecentOutcomes(size=0)
