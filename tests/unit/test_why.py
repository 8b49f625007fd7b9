"""`fabric why` for a task in its capability queue: pure decisions, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.protocol.messages import TaskStatus
from fabric.router.why import Serving, in_queue, serving, why_queued
from fabric.store.base import AgentRecord, TaskRecord

NOW = 1_000.0


def task(status: TaskStatus = TaskStatus.QUEUED, retry_at: float | None = None) -> TaskRecord:
    return TaskRecord(
        workflow_id="wf",
        task_id="t",
        capability="t.llm",
        status=status,
        attempts=1 if status is TaskStatus.RETRYING else 0,
        retry_at=retry_at,
        error={"type": "ValueError", "message": "boom"} if status is TaskStatus.RETRYING else None,
    )


@pytest.mark.parametrize(
    ("status", "retry_at", "expected"),
    [
        pytest.param(TaskStatus.QUEUED, None, True, id="queued"),
        pytest.param(TaskStatus.RETRYING, NOW + 5, False, id="retry-not-due"),
        pytest.param(TaskStatus.RETRYING, NOW, True, id="retry-due-now"),
        pytest.param(TaskStatus.RETRYING, NOW - 600, True, id="retry-long-due"),
        pytest.param(TaskStatus.RETRYING, None, True, id="reassigned"),
        pytest.param(TaskStatus.WAITING, None, False, id="waiting"),
        pytest.param(TaskStatus.RUNNING, None, False, id="running"),
    ],
)
def test_in_queue(status: TaskStatus, retry_at: float | None, expected: bool) -> None:
    assert in_queue(task(status, retry_at), NOW) is expected


WHY_CASES: list[Any] = [
    pytest.param(None, "no_agent", {"queue_depth": 2}, id="nobody"),
    pytest.param(Serving({}), "no_agent", {}, id="nobody-listed"),
    pytest.param(Serving({"a": "closed"}), "queued", {"agents": ["a"], "queue_depth": 2}, id="one-closed"),
    pytest.param(
        Serving({"a": "half_open"}),
        "circuit_open",
        {"agents": ["a"], "breakers": {"a": "half_open"}},
        id="half-open",
    ),
    pytest.param(
        Serving({"a": "open", "b": "half_open"}),
        "circuit_open",
        {"agents": ["a", "b"], "breakers": {"a": "open", "b": "half_open"}},
        id="all-tripped",
    ),
    pytest.param(
        Serving({"a": "open", "b": "closed"}), "queued", {"agents": ["a", "b"]}, id="one-closed-of-two"
    ),
    pytest.param(
        Serving({"a": "closed"}, stalled=("a",)), "queued", {"unhealthy_agents": ["a"]}, id="stalled"
    ),
]


@pytest.mark.parametrize(
    "the_task",
    [
        pytest.param(task(), id="queued"),
        pytest.param(task(TaskStatus.RETRYING, NOW - 1), id="due-retry"),
        pytest.param(task(TaskStatus.RETRYING), id="reassigned"),
    ],
)
@pytest.mark.parametrize(("who", "reason", "facts"), WHY_CASES)
def test_why_queued(the_task: TaskRecord, who: Serving | None, reason: str, facts: dict[str, Any]) -> None:
    answer = why_queued(the_task, depth=2, who=who)
    assert answer["reason"] == reason
    assert {k: answer.get(k) for k in facts} == facts
    assert "t.llm" in answer["detail"]
    if who is not None and reason == "circuit_open":
        for agent, state in who.breakers.items():
            assert f"{agent} ({state})" in answer["detail"]
    if the_task.status is TaskStatus.RETRYING:
        assert "attempt 1 failed (ValueError: boom)" in answer["detail"]
        assert "attempt 2 is due" in answer["detail"]
    assert "next attempt in" not in answer["detail"]


def agent(agent_id: str, caps: list[str], **kwargs: Any) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id, agent="x", host="h", pid=1, capabilities=caps, concurrency=1, **kwargs
    )


def test_serving_groups_live_agents_by_capability() -> None:
    who = serving(
        [
            agent("a", ["c1", "c2"], breakers={"c1": "open"}),
            agent("b", ["c1"], unhealthy={"c1": {"reason": "stalled"}}),
        ]
    )
    assert who["c1"] == Serving({"a": "open", "b": "closed"}, stalled=("b",))
    assert who["c2"] == Serving({"a": "closed"})
    assert not who["c1"].all_tripped
    assert "c3" not in who
