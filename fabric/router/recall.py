"""Recalling cancelled tasks: pure decisions, no I/O.

A cancel ends tasks ``cancelled`` in the store at once, but copies of their messages may still be out:
in a capability queue, in a delay queue waiting for a retry, handed back by a worker, or held by a worker
that was disconnected when the cancel was broadcast. Such a task is stored with ``recall`` set. Workers
learn the cancel from the broadcast on ``{ns}.control`` and, when they start or reconnect, from the RPC
``cancelled`` (whose answer :func:`cancels_answer` builds), and drop every copy they get, unrun.

A worker that drops a copy reports ``cancelled``: that copy is gone, so the flag is cleared and the list
stays as short as the copies still out. Any other event for a cancelled task means a copy reached a worker
that did not know (started before it could learn, or a second copy): the cancel is broadcast again and the
flag set again, and nothing is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.protocol.messages import EventStatus, TaskStatus


@dataclass(frozen=True, slots=True)
class Recall:
    """What to do about an event for a cancelled task."""

    #: The task's ``recall`` flag after the event.
    recall: bool
    #: Broadcast the task's cancel again on ``{ns}.control`` (after the change is committed).
    broadcast: bool


#: Statuses in which a task's message may be out: published and not yet settled for good. A waiting
#: task was never published; an escalated one has no copy kept in the broker.
_OUT = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING})


def recall_on_cancel(status: TaskStatus) -> bool:
    """Whether a task cancelled while ``status`` may have copies of its message out."""
    return status in _OUT


def recall_after(status: TaskStatus, event: EventStatus) -> Recall | None:
    """The recall decision for an event about a task stored with ``status``; None unless the task
    is ``cancelled`` (then the usual rules apply).

    Example:
        >>> recall_after(TaskStatus.CANCELLED, EventStatus.STARTED)
        Recall(recall=True, broadcast=True)
    """
    if status is not TaskStatus.CANCELLED:
        return None
    if event is EventStatus.CANCELLED:
        return Recall(recall=False, broadcast=False)
    return Recall(recall=True, broadcast=True)


def cancels_answer(keys: Sequence[tuple[str, str]], cursor: str | None) -> dict[str, Any]:
    """The answer of the RPC ``cancelled``: one page of recalled tasks grouped by workflow (in the
    order given), ``more`` while further pages follow, and the ``cursor`` to ask for the next one.

    Example:
        >>> cancels_answer([("wf", "a"), ("wf", "b")], None)
        {'cancels': [{'workflow_id': 'wf', 'task_ids': ['a', 'b']}], 'more': False, 'cursor': None}
    """
    grouped: dict[str, list[str]] = {}
    for workflow_id, task_id in keys:
        grouped.setdefault(workflow_id, []).append(task_id)
    return {
        "cancels": [{"workflow_id": wid, "task_ids": tids} for wid, tids in grouped.items()],
        "more": cursor is not None,
        "cursor": cursor,
    }
