"""What one decision of the workflow core reads and returns: a :class:`Changeset`. Pure, no I/O.

The shell loads the records a decision reads into a changeset (:func:`needs` tells it what a batch of
events may read); the core changes them and lists the effects to carry out once they are saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent, TaskStatus
from fabric.store.base import TaskRecord, WorkflowRecord

if TYPE_CHECKING:
    from fabric.metrics import TaskCounter

#: Event statuses that end a task.
_ENDING = frozenset({EventStatus.SUCCEEDED, EventStatus.FAILED, EventStatus.DEAD, EventStatus.CANCELLED})


class Incomplete(Exception):
    """A decision needs records the shell did not load: load the whole workflow and decide again."""


@dataclass(frozen=True, slots=True)
class Park:
    """Effect: publish a copy of ``task``'s message of ``attempt`` to ``{ns}.dead`` (confirmed), marked
    parked by ``agent``, *before* the changeset is saved."""

    task: TaskRecord
    reason: str
    error: ErrorInfo
    attempt: int
    agent: str


@dataclass(frozen=True, slots=True)
class Resolve:
    """Effect: resolve the ``task.escalated`` alert of a task with this summary."""

    task_id: str
    summary: str


@dataclass(slots=True)
class Changeset:
    """The records one decision reads and writes, what it changed, and the effects to carry out.

    Records come from the shell (``tasks``, ``workflow``); ``complete`` says ``tasks`` holds every task
    of the workflow, and ``absent`` names ids the shell asked for and the store did not have.
    """

    workflow_id: str
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    workflow: WorkflowRecord | None = None
    complete: bool = False
    absent: set[str] = field(default_factory=set)
    #: Tasks to save, by id.
    changed: dict[str, TaskRecord] = field(default_factory=dict)
    #: Save the workflow record too.
    workflow_changed: bool = False
    #: This changeset finished the workflow (its ``workflow_finished`` metric moves on commit).
    finished: bool = False
    #: Effect: tasks to publish once saved (ready now).
    released: list[TaskRecord] = field(default_factory=list)
    #: Effect: task notifications to send once saved, as each task was at each change.
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: Effect: task counters to move once saved: (counter, capability).
    counts: list[tuple[TaskCounter, str]] = field(default_factory=list)
    #: Effect: tasks escalated: each fires an alert once saved.
    escalated: list[TaskRecord] = field(default_factory=list)
    #: Effect: escalation alerts to resolve once saved.
    resolved: list[Resolve] = field(default_factory=list)
    #: Effect: cancelled tasks whose cancel is broadcast (again) once saved.
    recalled: list[str] = field(default_factory=list)
    #: Effect: leases renewed, (workflow_id, task_id, attempt), remembered before the save (so a lease
    #: check can never see a lease without its renewal).
    renewed: list[tuple[str, str, int]] = field(default_factory=list)
    #: Effect: copies to park before the save.
    parked: list[Park] = field(default_factory=list)
    #: Effect (queue ages), in order: (key, capability, since) for a task ready in its capability queue
    #: again since then, (key, capability, None) for one that left it.
    queue_ages: list[tuple[tuple[str, str], str, float | None]] = field(default_factory=list)

    def get(self, ids: Iterable[str]) -> list[TaskRecord]:
        """The records of ``ids`` (unknown ids left out); :class:`Incomplete` if one was not loaded."""
        found = []
        for task_id in ids:
            task = self.tasks.get(task_id)
            if task is not None:
                found.append(task)
            elif not self.complete and task_id not in self.absent:
                raise Incomplete(task_id)
        return found

    def all(self) -> dict[str, TaskRecord]:
        if not self.complete:
            raise Incomplete("every task")
        return self.tasks

    def the_workflow(self) -> WorkflowRecord:
        if self.workflow is None:
            raise Incomplete("the workflow record")
        return self.workflow

    def touch(self, task: TaskRecord, *, notify: bool = True) -> None:
        self.changed[task.task_id] = task
        if notify:
            self.notes.append(
                {
                    "workflow_id": task.workflow_id,
                    "task_id": task.task_id,
                    "status": str(task.status),
                    "attempts": task.attempts,
                    "agent": task.agent,
                    "error": task.error,
                }
            )

    @property
    def dirty(self) -> bool:
        """Something to save."""
        return bool(self.changed) or self.workflow_changed

    @property
    def announce(self) -> bool:
        """The workflow ended in this changeset: announce it once saved."""
        return self.workflow is not None and self.workflow.status.terminal and self.workflow_changed


# -- loading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Needs:
    """What the shell loads before applying a batch of events (beyond the events' own tasks)."""

    workflow: bool = False
    ids: frozenset[str] = frozenset()


def needs(events: Sequence[TaskEvent], tasks: dict[str, TaskRecord]) -> Needs:
    """What applying ``events`` may read besides their tasks (``tasks``, as loaded): the workflow and
    the direct dependents of a task that may end (released, or the first step of its cascade); the
    shell reads every task when the batch may end the workflow (:func:`may_finish`). Over-approximates
    (staleness is not judged here); a deeper cascade raises :class:`Incomplete`, and the shell decides
    again on every record.
    """
    workflow = False
    ids: set[str] = set()
    for event in events:
        task = tasks.get(event.task_id)
        if task is None or task.status.terminal or task.status is TaskStatus.ESCALATED:
            continue  # stays so for the whole batch: the event changes nothing that needs more
        if event.status in _ENDING:
            workflow = True
            ids.update(task.dependents)
    return Needs(workflow, frozenset(ids))


def may_finish(events: Sequence[TaskEvent], workflow: WorkflowRecord) -> bool:
    """Whether ``events`` may end every remaining task (then closing the workflow reads every task)."""
    return sum(1 for e in events if e.status in _ENDING) >= workflow.remaining
