"""The demo agent's handlers, called directly with hand-built tasks (demo.crash is never called)."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import Escalate, Task
from workers import demo


def _task(
    value: Any = None, *, upstream: dict[str, Any] | None = None, attempt: int = 1, capability: str = "demo.x"
) -> Task:
    return Task(
        input=value,
        upstream=upstream or {},
        workflow_id="wf",
        task_id="t",
        capability=capability,
        attempt=attempt,
        max_attempts=5,
        agent_id="demo@test",
        timeout_s=5.0,
    )


def test_demo_agent_capabilities() -> None:
    assert demo.agent.capabilities == [
        "demo.crash",
        "demo.echo",
        "demo.fail",
        "demo.flaky",
        "demo.review",
        "demo.sleep",
        "demo.sum",
    ]
    assert demo.agent.handlers["demo.sum"].is_async is False
    assert demo.agent.handlers["demo.echo"].is_async is True


@pytest.mark.parametrize(
    ("value", "upstream", "expected"),
    [
        ([1, 2, 3], {"a": 4, "b": [5, 6]}, 21),
        (7, {}, 7),
        (None, {"a": 1, "b": None}, 1),
        (None, {}, 0),
        ([], {}, 0),
        ([1.5, 1.5], {}, 3),
        (0.25, {"a": 1}, 1.25),
    ],
)
def test_sum_adds_input_and_upstream(value: Any, upstream: dict[str, Any], expected: float) -> None:
    result = demo.add(_task(value, upstream=upstream))

    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "upstream"),
    [(["1"], {}), ([1, True], {}), (1, {"a": "x"}), ({"n": 1}, {}), ([[1]], {})],
    ids=["string", "bool", "upstream-string", "dict", "nested-list"],
)
def test_sum_rejects_non_numbers(value: Any, upstream: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"demo\.sum adds numbers"):
        demo.add(_task(value, upstream=upstream))


async def test_flaky_fails_planned_attempts_then_returns_result() -> None:
    spec = {"fail_times": 2, "result": "finally"}

    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {attempt} of 2"):
            await demo.flaky(_task(spec, attempt=attempt))

    assert await demo.flaky(_task(spec, attempt=3)) == "finally"


async def test_flaky_defaults_to_one_failure_and_returns_the_attempt() -> None:
    with pytest.raises(RuntimeError):
        await demo.flaky(_task(None, attempt=1))

    assert await demo.flaky(_task(None, attempt=2)) == 2


async def test_flaky_with_no_planned_failures_succeeds_at_once() -> None:
    assert await demo.flaky(_task({"fail_times": 0, "result": [1]}, attempt=1)) == [1]


@pytest.mark.parametrize("value", [None, "text", {"k": [1, 2]}, [None], b"raw"])
async def test_echo_returns_its_input(value: Any) -> None:
    assert await demo.echo(_task(value)) == value


@pytest.mark.parametrize("value", [{"seconds": 0.001}, 0.001, {"seconds": 0}])
async def test_sleep_returns_the_seconds(value: Any) -> None:
    expected = value["seconds"] if isinstance(value, dict) else value

    assert await demo.sleep(_task(value)) == expected


async def test_sleep_zero_seconds_sleeps_zero_seconds() -> None:
    """A plain number is the number of seconds, 0 included (not the 1 s used when input is absent)."""
    assert await demo.sleep(_task(0)) == 0.0


async def test_fail_raises_its_input_as_message() -> None:
    with pytest.raises(ValueError, match="the model said no"):
        await demo.fail(_task("the model said no"))


async def test_review_escalates_until_approved() -> None:
    with pytest.raises(Escalate, match="check the totals"):
        await demo.review(_task({"note": "check the totals"}))
    with pytest.raises(Escalate, match="not approved"):
        await demo.review(_task(None))
    assert await demo.review(_task({"approved": True, "x": 1})) == {"approved": True, "x": 1}
