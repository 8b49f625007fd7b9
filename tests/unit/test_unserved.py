"""unserved_warnings: which `why` answers make a waiting submitter warn, and only once per capability."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.client.unserved import unserved_warnings


def no_agent(task_id: str, capability: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "task_id": task_id,
        "status": "queued",
        "reason": "no_agent",
        "detail": f"no live agent has capability {capability or 'x.y'!r} (1 task(s) wait for one)",
    }
    if capability is not None:
        answer["capability"] = capability
    return answer


def answer(task_id: str, reason: str, capability: str = "demo.echo") -> dict[str, Any]:
    return {"task_id": task_id, "status": "queued", "reason": reason, "capability": capability, "detail": "…"}


CASES = [
    pytest.param([], set(), {}, id="nothing-unfinished"),
    pytest.param(
        [
            answer("a", "queued"),
            answer("b", "running_on"),
            answer("c", "waiting_on"),
            answer("d", "circuit_open"),
        ],
        set(),
        {},
        id="served-capabilities-are-not-warned",
    ),
    pytest.param([no_agent("a", "llm.summarize")], set(), {"llm.summarize": ("a",)}, id="one-unserved"),
    pytest.param([no_agent("a", "llm.summarize")], {"llm.summarize"}, {}, id="warned-already"),
    pytest.param(
        [no_agent("a", "demo.sum"), no_agent("b", "demo.sum"), no_agent("c", "llm.call")],
        set(),
        {"demo.sum": ("a", "b"), "llm.call": ("c",)},
        id="one-warning-per-capability-naming-its-tasks",
    ),
    pytest.param(
        [no_agent("a", "demo.sum"), no_agent("c", "llm.call")],
        {"demo.sum"},
        {"llm.call": ("c",)},
        id="only-new",
    ),
    pytest.param([no_agent("a", None)], set(), {"x.y": ("a",)}, id="older-router-without-capability-field"),
]


@pytest.mark.parametrize(("answers", "warned", "expected"), CASES)
def test_unserved_warnings(
    answers: list[dict[str, Any]], warned: set[str], expected: dict[str, tuple[str, ...]]
) -> None:
    warnings = unserved_warnings(answers, warned)
    assert {w.capability: w.task_ids for w in warnings} == expected
    for warning in warnings:
        assert repr(warning.capability) in warning.message
        assert "still waiting" in warning.message


def test_a_caller_that_records_the_warned_is_warned_once() -> None:
    warned: set[str] = set()
    seen = []
    for _ in range(3):  # three checks, the capability still unserved each time
        for warning in unserved_warnings([no_agent("a", "demo.sum")], warned):
            warned.add(warning.capability)
            seen.append(warning.capability)
    assert seen == ["demo.sum"]
