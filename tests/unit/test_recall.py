"""Recalling cancelled tasks: the router's pure decisions (fabric/router/recall.py)."""

from __future__ import annotations

import pytest

from fabric.protocol.messages import EventStatus, TaskStatus
from fabric.router.recall import Recall, cancels_answer, recall_after, recall_on_cancel


@pytest.mark.parametrize(
    ("status", "recall"),
    [
        (TaskStatus.WAITING, False),  # never published: no copy anywhere
        (TaskStatus.QUEUED, True),  # in its capability queue, or handed back
        (TaskStatus.RUNNING, True),  # held by a worker (which may be cut off from the broadcast)
        (TaskStatus.RETRYING, True),  # in a delay queue
        (TaskStatus.ESCALATED, False),  # no copy is kept while it waits for an operator
        (TaskStatus.SUCCEEDED, False),
        (TaskStatus.CANCELLED, False),
    ],
)
def test_which_cancelled_tasks_are_recalled(status: TaskStatus, recall: bool) -> None:
    assert recall_on_cancel(status) is recall


@pytest.mark.parametrize(
    ("stored", "event", "expected"),
    [
        # A worker dropped a copy: it is gone, the flag is cleared, nothing is broadcast.
        (TaskStatus.CANCELLED, EventStatus.CANCELLED, Recall(recall=False, broadcast=False)),
        # A copy reached a worker that did not know: tell every worker again, keep the flag set.
        (TaskStatus.CANCELLED, EventStatus.STARTED, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.SUCCEEDED, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.FAILED, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.RETRYING, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.REASSIGNED, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.DEAD, Recall(recall=True, broadcast=True)),
        (TaskStatus.CANCELLED, EventStatus.ESCALATED, Recall(recall=True, broadcast=True)),
        # Not cancelled: the usual rules.
        (TaskStatus.RUNNING, EventStatus.CANCELLED, None),
        (TaskStatus.DEAD, EventStatus.STARTED, None),
        (TaskStatus.SUCCEEDED, EventStatus.FAILED, None),
        (TaskStatus.QUEUED, EventStatus.STARTED, None),
    ],
)
def test_recall_after_an_event(stored: TaskStatus, event: EventStatus, expected: Recall | None) -> None:
    assert recall_after(stored, event) == expected


@pytest.mark.parametrize(
    ("keys", "cursor", "expected"),
    [
        ([], None, {"cancels": [], "more": False, "cursor": None}),
        (
            [("wf-a", "x"), ("wf-b", "q"), ("wf-b", "z")],
            "c1",
            {
                "cancels": [
                    {"workflow_id": "wf-a", "task_ids": ["x"]},
                    {"workflow_id": "wf-b", "task_ids": ["q", "z"]},
                ],
                "more": True,
                "cursor": "c1",
            },
        ),
    ],
)
def test_cancels_answer_groups_by_workflow(
    keys: list[tuple[str, str]], cursor: str | None, expected: dict[str, object]
) -> None:
    assert cancels_answer(keys, cursor) == expected
