"""An operator's actions on a workflow: pure decisions of the workflow core, no I/O.

``fabric cancel``, ``fabric dead replay``, ``fabric resume`` and ``fabric abort`` each take the
records the shell loaded (a :class:`~fabric.router.changeset.Changeset`) and change them through the
same rules as the workers' events (:mod:`fabric.router.workflow`): a task ends through
:func:`~fabric.router.workflow.finish` and a workflow through
:func:`~fabric.router.workflow.close_workflow`. An operator entry in the task's history starts a new
attempt epoch (:mod:`fabric.router.history`).
"""

from __future__ import annotations

from typing import Any

from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent, TaskStatus, WorkflowStatus
from fabric.router import history
from fabric.router.changeset import Changeset, Park, Resolve
from fabric.router.recall import recall_on_cancel
from fabric.router.workflow import FAILED_STATES, close_workflow, finish
from fabric.store.base import TaskRecord


def _task(changes: Changeset, task_id: str) -> TaskRecord:
    found = changes.get([task_id])
    if not found:
        raise KeyError(f"workflow {changes.workflow_id} has no task {task_id!r}")
    return found[0]


def escalated_task(changes: Changeset, task_id: str, verb: str) -> TaskRecord:
    """The escalated task ``task_id``.

    Raises:
        KeyError: no such task. ValueError: it is not escalated.
    """
    task = _task(changes, task_id)
    if task.status is not TaskStatus.ESCALATED:
        workflow_id = changes.workflow_id
        raise ValueError(
            f"task {workflow_id}/{task_id} is {task.status}, not escalated; only an escalated task can "
            f"be {verb} (see `fabric why {workflow_id}`)"
        )
    return task


def cancel(changes: Changeset, task_id: str | None, now: float) -> list[str]:
    """Cancel the workflow, or one task and everything downstream of it: unfinished tasks end
    ``cancelled`` at once. Returns the ids cancelled, sorted (their cancel is broadcast once saved).

    Raises:
        KeyError: no such task.
    """
    tasks = changes.all()
    workflow = changes.the_workflow()
    if task_id is not None:
        if task_id not in tasks:
            raise KeyError(f"workflow {changes.workflow_id} has no task {task_id!r}")
        targets, frontier = {task_id}, [task_id]
        while frontier:
            for dependent in tasks[frontier.pop()].dependents:
                if dependent not in targets:
                    targets.add(dependent)
                    frontier.append(dependent)
    else:
        targets = set(tasks)
    cancelled = []
    for tid in sorted(targets):
        task = tasks[tid]
        if task.status.terminal:
            continue
        if task.status is TaskStatus.ESCALATED:
            changes.resolved.append(
                Resolve(tid, f"task {changes.workflow_id}/{tid} cancelled by an operator")
            )
        task.recall = recall_on_cancel(task.status)
        task.status, task.finished_at, task.lease_s = TaskStatus.CANCELLED, now, None
        task.error = {"type": "Cancelled", "message": "cancelled by an operator"}
        task.escalation = None
        changes.queue_ages.append((task.key, task.capability, None))
        changes.touch(task)
        cancelled.append(tid)
    if cancelled:
        close_workflow(changes, workflow, len(cancelled), now)
        changes.recalled.extend(cancelled)
    return cancelled


def replay(changes: Changeset, task_id: str, now: float) -> list[str]:
    """Run a dead or failed task again from its first attempt: its dependents that never ran because
    of it wait again, and a finished workflow runs again. Returns the ids revived, sorted.

    Raises:
        KeyError: no such task. ValueError: it is neither dead nor failed.
    """
    tasks = changes.all()
    workflow = changes.the_workflow()
    task = _task(changes, task_id)
    if task.status not in (TaskStatus.DEAD, TaskStatus.FAILED):
        raise ValueError(f"task {task_id} is {task.status}; only dead or failed tasks can be replayed")
    task.history.append(
        history.operator_entry(task.attempts, "Replayed", f"replayed after {task.attempts} attempt(s)", now)
    )
    task.status, task.attempts, task.dispatched = TaskStatus.QUEUED, 0, False
    task.error = task.result = task.agent = task.finished_at = None
    task.queued_at = now
    changes.changed[task.task_id] = task
    revived = True
    while revived:  # until no downstream task can be revived any more
        revived = False
        for other in tasks.values():
            if other.status is not TaskStatus.UPSTREAM_FAILED:
                continue
            deps = [tasks[d] for d in other.depends_on if d in tasks]
            if any(d.status in FAILED_STATES for d in deps):
                continue
            other.status, other.error, other.finished_at = TaskStatus.WAITING, None, None
            other.pending_deps = sum(1 for d in deps if d.status is not TaskStatus.SUCCEEDED)
            changes.changed[other.task_id] = other
            revived = True
    workflow.status, workflow.finished_at, workflow.notified = WorkflowStatus.RUNNING, None, False
    workflow.remaining = sum(1 for t in tasks.values() if not t.status.terminal)
    changes.workflow_changed = True
    changes.released.append(task)
    return sorted(changes.changed)


#: ``resume``'s ``input`` when the task keeps its input.
KEEP_INPUT: Any = object()


def resume(changes: Changeset, task_id: str, now: float, new_input: Any = KEEP_INPUT) -> TaskRecord:
    """Run an escalated task again with a fresh attempt budget, with ``new_input`` if given. The resume,
    and the new input, are kept in the task's history (a new attempt epoch: attempts count from 1 again,
    and the attempts given up before are not the new ones').

    Raises:
        KeyError: no such task. ValueError: it is not escalated.
    """
    task = escalated_task(changes, task_id, "resumed")
    replaced = new_input is not KEEP_INPUT
    message = f"resumed by an operator after {task.attempts} attempt(s)" + (
        " with a new input" if replaced else ""
    )
    new = {"input": new_input} if replaced else {}
    if replaced:
        task.input = new_input
    task.history.append(history.operator_entry(task.attempts, "Resumed", message, now, **new))
    task.status, task.attempts, task.dispatched = TaskStatus.QUEUED, 0, False
    task.error = task.agent = task.escalation = task.retry_at = task.started_at = None
    task.queued_at = now
    changes.touch(task)
    changes.released.append(task)
    changes.resolved.append(Resolve(task_id, f"task {changes.workflow_id}/{task_id} resumed by an operator"))
    return task


def abort(changes: Changeset, task_id: str, reason: str, now: float) -> TaskRecord:
    """End an escalated task ``dead`` with the operator's ``reason``: a copy is parked first (so
    ``fabric dead replay`` can run it again), its dependents end ``upstream_failed`` and the workflow
    closes when nothing else remains.

    Raises:
        KeyError: no such task. ValueError: it is not escalated.
    """
    task = escalated_task(changes, task_id, "aborted")
    error = ErrorInfo(type="Aborted", message=reason)
    attempt = max(task.attempts, 1)
    changes.parked.append(Park(task, reason, error, attempt, "operator"))
    event = TaskEvent(
        workflow_id=task.workflow_id,
        task_id=task.task_id,
        attempt=attempt,
        agent_id="operator",
        status=EventStatus.DEAD,
        error=error,
        reason=reason,
        at=now,
    )
    finish(changes, task, event, TaskStatus.DEAD, now)
    task.escalation = None
    task.history.append(history.operator_entry(task.attempts, "Aborted", reason, now))
    changes.resolved.append(
        Resolve(task_id, f"task {changes.workflow_id}/{task_id} aborted by an operator: {reason}")
    )
    return task
