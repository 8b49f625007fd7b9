"""`fabric why` answered by the pure explain (fabric.router.why.explain): every reason, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.protocol.messages import TaskStatus
from fabric.router.why import Serving, explain, queues_to_read, select
from fabric.store.base import TaskRecord

NOW = 1_000.0


def task(task_id: str, status: TaskStatus, **fields: Any) -> TaskRecord:
    return TaskRecord(workflow_id="wf", task_id=task_id, capability=f"cap.{task_id}", status=status, **fields)


TASKS = {
    t.task_id: t
    for t in [
        task("done", TaskStatus.SUCCEEDED),
        task("dead", TaskStatus.DEAD),
        task("wait", TaskStatus.WAITING, depends_on=["done", "run"]),
        task("queued", TaskStatus.QUEUED),
        task("nobody", TaskStatus.QUEUED),
        task("tripped", TaskStatus.QUEUED),
        task("run", TaskStatus.RUNNING, agent="a@h:1", attempts=2, started_at=990.0),
        task(
            "backoff",
            TaskStatus.RETRYING,
            attempts=1,
            retry_at=NOW + 30,
            error={"type": "ValueError", "message": "boom"},
        ),
        task(
            "esc",
            TaskStatus.ESCALATED,
            attempts=3,
            escalation={
                "reason": "exhausted",
                "at": 950.0,
                "agent": "a@h:1",
                "attempt": 3,
                "error": {"type": "Escalate", "message": "check"},
            },
        ),
    ]
}
WHO = {
    "cap.queued": Serving({"a@h:1": "closed"}, stalled=("a@h:1",)),
    "cap.tripped": Serving({"a@h:1": "open"}),
}
DEPTHS = {"cap.queued": 4, "cap.tripped": 2}


@pytest.mark.parametrize(
    ("task_id", "expected"),
    [
        ("done", {"reason": "finished", "detail": "ended succeeded"}),
        ("wait", {"reason": "waiting_on", "waiting_on": ["run"], "detail": "waiting on run"}),
        ("nobody", {"reason": "no_agent", "queue_depth": 0}),
        (
            "queued",
            {"reason": "queued", "queue_depth": 4, "agents": ["a@h:1"], "unhealthy_agents": ["a@h:1"]},
        ),
        ("tripped", {"reason": "circuit_open", "queue_depth": 2, "breakers": {"a@h:1": "open"}}),
        (
            "run",
            {
                "reason": "running_on",
                "agent": "a@h:1",
                "since": 990.0,
                "detail": "running on a@h:1 (attempt 2)",
            },
        ),
        ("backoff", {"reason": "backoff_until", "until": NOW + 30}),
        ("esc", {"reason": "escalated", "escalation_reason": "exhausted", "since": 950.0, "agent": "a@h:1"}),
    ],
)
def test_each_reason(task_id: str, expected: dict[str, Any]) -> None:
    selected = select(TASKS, "wf", task_id)
    (answer,) = explain("wf", TASKS, selected, now=NOW, who=WHO, depths=DEPTHS)
    assert answer["task_id"] == task_id
    assert answer["status"] == str(TASKS[task_id].status)
    assert answer["capability"] == f"cap.{task_id}"
    assert {k: answer[k] for k in expected} == expected


def test_details_name_the_error_and_the_commands() -> None:
    answers = {
        a["task_id"]: a for a in explain("wf", TASKS, list(TASKS.values()), now=NOW, who=WHO, depths=DEPTHS)
    }
    assert answers["backoff"]["detail"] == "attempt 1 failed (ValueError: boom); next attempt in 30s"
    assert "`fabric resume wf --task esc` or `fabric abort wf --task esc`" in answers["esc"]["detail"]
    assert "Escalate: check" in answers["esc"]["detail"]


def test_select_takes_the_task_asked_about_or_every_unfinished_one() -> None:
    assert [t.task_id for t in select(TASKS, "wf", "done")] == ["done"]
    unfinished = [t.task_id for t in select(TASKS, "wf", None)]
    assert unfinished == ["wait", "queued", "nobody", "tripped", "run", "backoff", "esc"]
    with pytest.raises(KeyError, match="workflow wf has no task 'nope'"):
        select(TASKS, "wf", "nope")


def test_only_the_queues_of_tasks_waiting_in_them_are_read() -> None:
    assert queues_to_read(TASKS.values(), NOW) == ["cap.nobody", "cap.queued", "cap.tripped"]
    assert queues_to_read(TASKS.values(), NOW + 60) == [
        "cap.backoff",
        "cap.nobody",
        "cap.queued",
        "cap.tripped",
    ]
