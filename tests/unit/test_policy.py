"""The failure policy is a pure function of the failed attempt."""

from __future__ import annotations

import json
import os

import pytest

from fabric.errors import ConfigError
from fabric.policy import (
    DEFAULT_TIERS_MS,
    REASON_EXHAUSTED,
    REASON_NO_OTHER_AGENT,
    REASON_REQUESTED,
    REASON_WORKER_LOST,
    Action,
    Decision,
    FailFast,
    Failure,
    RetryPolicy,
    give_up,
)
from fabric.protocol.messages import ErrorInfo, OnExhausted
from fabric.router.admission import Refusal, admit
from fabric.settings import CapabilityPolicy, PolicySettings, load_settings

ERROR = ErrorInfo(type="RuntimeError", message="boom")


@pytest.fixture(autouse=True)
def _no_fabric_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here see only what each test sets."""
    for name in list(os.environ):
        if name.upper().startswith("FABRIC_"):
            monkeypatch.delenv(name)


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


# --- escalation -----------------------------------------------------------------------------------------


def test_a_handlers_escalate_is_escalated_at_once_whatever_the_attempts() -> None:
    for attempt, max_attempts in ((1, 5), (5, 5)):
        decision = RetryPolicy().decide(failure(attempt, max_attempts, signal="Escalate"))
        assert (decision.action, decision.reason) == (Action.ESCALATE, REASON_REQUESTED)
        assert decision.error == ERROR


def test_out_of_attempts_escalates_when_on_exhausted_says_so() -> None:
    decision = RetryPolicy().decide(failure(3, max_attempts=3, on_exhausted=OnExhausted.ESCALATE))
    assert (decision.action, decision.reason) == (Action.ESCALATE, REASON_EXHAUSTED)
    assert decision.error == ERROR
    # ... and only then: before the last attempt it still retries.
    assert RetryPolicy().decide(failure(2, 3, on_exhausted=OnExhausted.ESCALATE)).action is Action.RETRY


def test_a_reassign_out_of_attempts_follows_on_exhausted() -> None:
    parked = RetryPolicy().decide(failure(3, 3, signal="Reassign"))
    escalated = RetryPolicy().decide(failure(3, 3, signal="Reassign", on_exhausted=OnExhausted.ESCALATE))
    assert (parked.action, parked.reason) == (Action.ABORT, REASON_EXHAUSTED)
    assert (escalated.action, escalated.reason) == (Action.ESCALATE, REASON_EXHAUSTED)


def test_abort_and_unretryable_errors_park_even_when_on_exhausted_escalates() -> None:
    aborted = RetryPolicy().decide(
        failure(1, signal="Abort", requested_reason="bad input", on_exhausted=OnExhausted.ESCALATE)
    )
    assert (aborted.action, aborted.reason) == (Action.ABORT, "bad input")
    error = ErrorInfo(type="ResultNotSerializable", message="tuple key")
    unfit = RetryPolicy().decide(
        Failure(error=error, attempt=1, max_attempts=5, capability="cap", on_exhausted=OnExhausted.ESCALATE)
    )
    assert unfit.action is Action.ABORT


@pytest.mark.parametrize("reason", [REASON_EXHAUSTED, REASON_NO_OTHER_AGENT, REASON_WORKER_LOST])
def test_give_up_parks_or_escalates_with_the_reason(reason: str) -> None:
    assert give_up(ERROR, reason, OnExhausted.PARK) == Decision(Action.ABORT, ERROR, reason=reason)
    assert give_up(ERROR, reason, OnExhausted.ESCALATE) == Decision(Action.ESCALATE, ERROR, reason=reason)


def test_on_exhausted_defaults_to_park() -> None:
    assert failure(1).on_exhausted is OnExhausted.PARK
    assert PolicySettings().on_exhausted is OnExhausted.PARK


# --- overrides: the task, then its capability, then the default ---------------------------------------


POLICY = PolicySettings(
    on_exhausted=OnExhausted.PARK,
    capabilities={
        "llm.call": CapabilityPolicy(on_exhausted=OnExhausted.ESCALATE, max_attempts=6),
        "only.attempts": CapabilityPolicy(max_attempts=2),
    },
)


@pytest.mark.parametrize(
    ("capability", "task_value", "expected"),
    [
        ("other", None, OnExhausted.PARK),
        ("llm.call", None, OnExhausted.ESCALATE),
        ("only.attempts", None, OnExhausted.PARK),
        ("llm.call", OnExhausted.PARK, OnExhausted.PARK),
        ("other", OnExhausted.ESCALATE, OnExhausted.ESCALATE),
    ],
)
def test_on_exhausted_precedence(
    capability: str, task_value: OnExhausted | None, expected: OnExhausted
) -> None:
    assert POLICY.on_exhausted_for(capability, task_value) is expected


@pytest.mark.parametrize(
    ("capability", "task_value", "expected"),
    [("other", None, 3), ("llm.call", None, 6), ("only.attempts", None, 2), ("llm.call", 9, 9)],
)
def test_max_attempts_precedence(capability: str, task_value: int | None, expected: int) -> None:
    assert POLICY.max_attempts_for(capability, task_value, 3) == expected


def test_a_default_of_escalate_applies_to_every_capability() -> None:
    policy = PolicySettings(on_exhausted=OnExhausted.ESCALATE)
    assert policy.on_exhausted_for("anything") is OnExhausted.ESCALATE
    assert policy.on_exhausted_for("anything", OnExhausted.PARK) is OnExhausted.PARK


def test_policy_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_POLICY__ON_EXHAUSTED", "escalate")
    monkeypatch.setenv(
        "FABRIC_POLICY__CAPABILITIES", '{"llm.call": {"on_exhausted": "park", "max_attempts": 4}}'
    )
    policy = load_settings().policy
    assert policy.on_exhausted is OnExhausted.ESCALATE
    assert policy.on_exhausted_for("llm.call") is OnExhausted.PARK
    assert policy.max_attempts_for("llm.call", None, 3) == 4


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("FABRIC_POLICY__ON_EXHAUSTED", "retry", "FABRIC_POLICY__ON_EXHAUSTED"),
        ("FABRIC_POLICY__CAPABILITIES", '{"Bad Name": {"on_exhausted": "park"}}', "Bad Name"),
        ("FABRIC_POLICY__CAPABILITIES", '{"llm.call": {"on_exhaust": "park"}}', "on_exhaust"),
    ],
)
def test_bad_policy_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"(?i){named}"):
        load_settings()


def test_admission_resolves_the_overrides_into_each_task() -> None:
    body = json.dumps(
        {
            "tasks": [
                {"id": "a", "capability": "llm.call"},
                {"id": "b", "capability": "llm.call", "on_exhausted": "park", "max_attempts": 2},
                {"id": "c", "capability": "other"},
                {"id": "d", "capability": "other", "on_exhausted": "escalate"},
            ]
        }
    ).encode()
    admitted = admit(
        body,
        "application/json",
        message_id="m",
        reply_to=None,
        correlation_id=None,
        max_body_bytes=1 << 20,
        max_tasks=10,
        default_max_attempts=3,
        policy=POLICY,
    )
    tasks = {t.task_id: (t.on_exhausted, t.max_attempts) for t in admitted.tasks}
    assert tasks == {"a": ("escalate", 6), "b": ("park", 2), "c": ("park", 3), "d": ("escalate", 3)}


def test_a_submission_with_an_unknown_on_exhausted_is_invalid() -> None:
    body = json.dumps({"tasks": [{"id": "a", "capability": "x", "on_exhausted": "explode"}]}).encode()
    with pytest.raises(Refusal) as refused:
        admit(
            body,
            "application/json",
            message_id="m",
            reply_to=None,
            correlation_id=None,
            max_body_bytes=1 << 20,
            max_tasks=10,
            default_max_attempts=3,
        )
    assert refused.value.reason == "invalid"
    assert "on_exhausted" in refused.value.detail
