"""The workflow state machine: pure decisions, no I/O, no clock read, no asyncio.

The shell (``fabric.router.service``) loads the records a decision needs into a :class:`Changeset`,
calls one function here, saves what the changeset says changed in one atomic batch, and then carries out
its effects in the durability order (docs in ``service``): broadcast the cancels it recalls, publish the
tasks it released, send its task notifications, fire its alerts, move its counters, announce a workflow
it finished. Nothing here calls back into the shell.

One rule per state change:

* :func:`apply_event`: one task event (docs/protocol.md §5) → an :class:`EventVerdict`;
* :func:`finish`: the one terminal state of a task, its dependents released or cascaded;
* :func:`close_workflow`: the only place a workflow's final status is decided;
* :func:`lapse`: an attempt whose lease lapsed; :func:`fail`: a task the router itself fails;
* the operator's cancel, replay, resume and abort are in :mod:`fabric.router.actions`.

A decision that needs a record the shell did not load raises :class:`Incomplete`; the shell loads the
whole workflow and decides again on fresh records (:func:`needs` tells it what to load first). The
changeset and what a batch loads are in :mod:`fabric.router.changeset`.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from typing import TYPE_CHECKING

from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent, TaskStatus, WorkflowStatus
from fabric.router import history
from fabric.router.changeset import Changeset, Incomplete, Needs, Park, Resolve, may_finish, needs
from fabric.router.recall import recall_after
from fabric.store.base import TaskRecord, WorkflowRecord

if TYPE_CHECKING:
    from fabric.metrics import TaskCounter

__all__ = [
    "FAILED_STATES",
    "Changeset",
    "EventVerdict",
    "Incomplete",
    "Needs",
    "Park",
    "Resolve",
    "apply_event",
    "cascade",
    "close_workflow",
    "escalate",
    "fail",
    "finish",
    "is_stale",
    "lapse",
    "may_finish",
    "needs",
]

log = logging.getLogger("fabric.router")

#: Task states that make a workflow end ``failed``.
FAILED_STATES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.UPSTREAM_FAILED})

#: The task counter a final state moves (upstream_failed and cancelled tasks never ran to an end).
_FINAL_COUNTERS: dict[TaskStatus, TaskCounter] = {
    TaskStatus.SUCCEEDED: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.DEAD: "parked",
}


class EventVerdict(enum.StrEnum):
    """What became of one task event applied to its workflow's changeset (it decides how the event's
    delivery is settled)."""

    #: Applied (a stale attempt's outcome goes to the task's history): acked.
    OK = "ok"
    #: No such task in the state store: parked, for an operator to see.
    UNKNOWN = "unknown"
    #: The task finished, or waits for an operator: nothing changes; acked.
    LATE = "late"
    #: A redelivered event of a finished task: acked, and what it may not have done yet (release the
    #: dependents, announce the workflow) is done now.
    RECONCILE = "reconcile"


# -- events ---------------------------------------------------------------------------------------


def apply_event(
    changes: Changeset, event: TaskEvent, *, redelivered: bool, span: str | None, now: float
) -> EventVerdict:
    """Apply one event to the changeset; returns what became of it.

    Args:
        redelivered: the broker redelivered the event (a finished task then reconciles).
        span: the ``traceparent`` of the event's attempt, with tracing.
        now: the time of the decision (seconds since the epoch).
    """
    found = changes.get([event.task_id])
    if not found:
        return EventVerdict.UNKNOWN
    task = found[0]
    # Any event says the task left its queue; a retry is ready again when its delay ends (below).
    changes.queue_ages.append((task.key, task.capability, None))
    recall = recall_after(task.status, event.status)
    if recall is not None:
        # A copy of a cancelled task reached a worker: nothing is counted; a worker that ran it
        # (it did not know) is told again, and so are workers that start later (the flag).
        if recall.recall != task.recall:
            task.recall = recall.recall
            changes.touch(task, notify=False)
        if recall.broadcast:
            log.info(
                "%s event for cancelled task %s/%s: broadcasting its cancel again",
                event.status,
                task.workflow_id,
                task.task_id,
            )
            changes.recalled.append(task.task_id)
    if task.status.terminal:
        # A redelivered event for a finished task: the router may have died (or a publish failed)
        # between recording it and releasing dependents or announcing: finish that.
        log.debug("late %s event for finished task %s/%s", event.status, task.workflow_id, task.task_id)
        return EventVerdict.RECONCILE if redelivered else EventVerdict.LATE
    if task.status is TaskStatus.ESCALATED:
        # Only an operator moves an escalated task on (resume, abort, cancel). An event for it now
        # is a duplicate (a worker died between reporting and acking, and the task ran again).
        log.info(
            "ignoring %s event of escalated task %s/%s (attempt %d)",
            event.status,
            task.workflow_id,
            task.task_id,
            event.attempt,
        )
        return EventVerdict.LATE
    status = event.status
    if is_stale(event.attempt, task.attempts, history.lapsed_attempts(task.history)):
        # An attempt older than the current one (overtaken by a retry, or given up when its lease
        # lapsed): its outcome is not this task's. Failures and late results go to the history.
        if status is not EventStatus.STARTED:
            log.info(
                "ignoring %s of stale attempt %d of %s/%s (current %d)",
                status,
                event.attempt,
                task.workflow_id,
                task.task_id,
                task.attempts,
            )
            history.remember_late(task.history, event)
            changes.touch(task, notify=False)
        return EventVerdict.OK
    # With tracing, an event carries its attempt's span: dependents and later attempts link to it.
    if span is not None and event.attempt >= task.attempts:
        task.span = span
    if status in (EventStatus.RETRYING, EventStatus.REASSIGNED):
        changes.queue_ages.append((task.key, task.capability, event.retry_at or event.at))
    if event.started_at is not None and status is not EventStatus.STARTED:
        # An attempt that ended before its worker's started_after_s: it started, unannounced.
        _record_start(changes, task, event.started_at)
    if status is EventStatus.STARTED:
        # A lease announced for the attempt already running is not a new start.
        leasing = task.status is TaskStatus.RUNNING and event.attempt == task.attempts
        if not (leasing and event.lease_s is not None):
            _record_start(changes, task, event.at)
        if event.lease_s is not None:
            task.lease_s = event.lease_s
            changes.renewed.append((task.workflow_id, task.task_id, event.attempt))
        elif event.attempt > task.attempts:
            task.lease_s = None
        _transition(changes, task, event, TaskStatus.RUNNING)
    elif status is EventStatus.SUCCEEDED:
        released_before = len(changes.released)
        finish(changes, task, event, TaskStatus.SUCCEEDED, now)
        # The attempt that succeeded released them: their publish spans hang under it.
        for dependent in changes.released[released_before:]:
            dependent.release = span
    elif status is EventStatus.FAILED:
        finish(changes, task, event, TaskStatus.FAILED, now)
    elif status is EventStatus.DEAD:
        finish(changes, task, event, TaskStatus.DEAD, now)
    elif status is EventStatus.CANCELLED:
        finish(changes, task, event, TaskStatus.CANCELLED, now)
    elif status in (EventStatus.RETRYING, EventStatus.REASSIGNED):
        if not any(e.get("attempt") == event.attempt and e.get("at") == event.at for e in task.history):
            changes.counts.append(("retried", task.capability))
        _transition(changes, task, event, TaskStatus.RETRYING)
    elif status is EventStatus.ESCALATED:
        escalate(changes, task, event)
    return EventVerdict.OK


def is_stale(attempt: int, current: int, lapsed: set[int]) -> bool:
    """Whether an event of ``attempt`` is stale for a task whose current attempt is ``current``: an
    earlier attempt, or one the router gave up when its lease lapsed.

    Example:
        >>> is_stale(1, 2, set()), is_stale(2, 2, {2}), is_stale(2, 2, set())
        (True, True, False)
    """
    return attempt < current or attempt in lapsed


def escalate(changes: Changeset, task: TaskRecord, event: TaskEvent) -> None:
    """``task`` waits for an operator; its alert fires once the change is saved."""
    _transition(changes, task, event, TaskStatus.ESCALATED)
    changes.counts.append(("escalated", task.capability))
    task.escalation = {
        "reason": event.reason or "requested",
        "attempt": event.attempt,
        "agent": event.agent_id,
        "error": event.error.model_dump() if event.error is not None else None,
        "at": event.at,
    }
    changes.escalated.append(task)


def _transition(changes: Changeset, task: TaskRecord, event: TaskEvent, status: TaskStatus) -> None:
    task.retry_at = event.retry_at if status is TaskStatus.RETRYING else None
    if status is not TaskStatus.RUNNING:
        task.lease_s = None
    task.status = status
    task.attempts = max(task.attempts, event.attempt)
    task.agent = event.agent_id
    if event.error is not None:
        task.error = event.error.model_dump()
        history.remember_failure(task.history, event)
    changes.touch(task)


def _record_start(changes: Changeset, task: TaskRecord, at: float) -> None:
    """``task`` started at ``at``: counted once (a redelivered event carries the same time)."""
    if task.started_at != at:
        changes.counts.append(("started", task.capability))
    task.started_at = at


# -- ending tasks and workflows -------------------------------------------------------------------


def finish(changes: Changeset, task: TaskRecord, event: TaskEvent, status: TaskStatus, now: float) -> None:
    """Record the one terminal state of ``task``, release or end its dependents, and close the workflow
    when nothing remains."""
    workflow = changes.the_workflow()
    task.status = status
    task.lease_s = None
    task.attempts = max(task.attempts, event.attempt)
    task.agent = event.agent_id
    task.finished_at = event.at
    task.result = event.result if status is TaskStatus.SUCCEEDED else None
    task.error = event.error.model_dump() if event.error is not None else None
    if event.error is not None:
        history.remember_failure(task.history, event)
    changes.touch(task)
    counter = _FINAL_COUNTERS.get(status)
    if counter is not None:
        changes.counts.append((counter, task.capability))
    ended = 1
    if status is TaskStatus.SUCCEEDED:
        for dependent in changes.get(task.dependents):
            if dependent.status.terminal:
                continue  # already ended (upstream_failed through another dependency)
            dependent.pending_deps -= 1
            if dependent.pending_deps <= 0 and dependent.status is TaskStatus.WAITING:
                dependent.status = TaskStatus.QUEUED
                dependent.queued_at = now
                dependent.dispatched = False
                changes.released.append(dependent)
            changes.touch(dependent, notify=dependent.status is TaskStatus.QUEUED)
    else:
        cascade_to = TaskStatus.CANCELLED if status is TaskStatus.CANCELLED else TaskStatus.UPSTREAM_FAILED
        ended += cascade(changes, task, cascade_to, now)
    close_workflow(changes, workflow, ended, now)


def cascade(changes: Changeset, failed: TaskRecord, status: TaskStatus, now: float) -> int:
    """Every task downstream of ``failed`` that has not finished ends with ``status`` (never runs).
    Returns how many tasks it ended."""
    ended = 0
    seen = {failed.task_id}
    frontier = deque([failed.dependents])
    while frontier:
        ids = [i for i in frontier.popleft() if i not in seen]
        seen.update(ids)
        for dependent in changes.get(ids):
            if not dependent.status.terminal:
                dependent.status = status
                dependent.finished_at = now
                dependent.error = {
                    "type": "UpstreamFailed",
                    "message": f"dependency {failed.task_id!r} ended {failed.status}",
                }
                changes.touch(dependent)
                ended += 1
            frontier.append(dependent.dependents)
    return ended


def close_workflow(changes: Changeset, workflow: WorkflowRecord, ended: int, now: float) -> None:
    """``ended`` more tasks of ``workflow`` ended: when none remains, the workflow ends, ``failed`` if a
    task failed, ``cancelled`` if one was cancelled, else ``succeeded``. The only place a workflow's
    final status is decided."""
    workflow.remaining = max(0, workflow.remaining - ended)
    changes.workflow_changed = True
    if workflow.remaining == 0:
        statuses = {t.status for t in changes.all().values()}
        workflow.finished_at = now
        changes.finished = True
        if statuses & FAILED_STATES:
            workflow.status = WorkflowStatus.FAILED
        elif TaskStatus.CANCELLED in statuses:
            workflow.status = WorkflowStatus.CANCELLED
        else:
            workflow.status = WorkflowStatus.SUCCEEDED


def fail(changes: Changeset, task: TaskRecord, error: ErrorInfo, now: float) -> None:
    """End ``task`` as failed for a reason found by the router itself (no worker ever ran it)."""
    event = TaskEvent(
        workflow_id=task.workflow_id,
        task_id=task.task_id,
        attempt=max(task.attempts, 1),
        agent_id="router",
        status=EventStatus.FAILED,
        error=error,
        at=now,
    )
    changes.tasks.setdefault(task.task_id, task)
    finish(changes, task, event, TaskStatus.FAILED, now)


def lapse(changes: Changeset, task_id: str, attempt: int, now: float) -> bool:
    """The lease of ``attempt`` lapsed: count it lost; queue the next attempt, or escalate or park the
    task at its limit. False when an event overtook the check (nothing changes)."""
    found = changes.get([task_id])
    if not found:
        return False
    task = found[0]
    if task.status is not TaskStatus.RUNNING or task.lease_s is None or task.attempts != attempt:
        return False
    error = ErrorInfo(
        type="WorkerLost",
        message=f"attempt {attempt} on {task.agent} stopped renewing its lease for "
        f"{task.lease_s:g}s: its worker died, stalled or lost the broker",
    )
    exhausted = attempt >= task.max_attempts
    escalating = exhausted and task.on_exhausted == "escalate"
    event = TaskEvent(
        workflow_id=task.workflow_id,
        task_id=task_id,
        attempt=attempt,
        agent_id=task.agent or "unknown",
        status=EventStatus.ESCALATED
        if escalating
        else (EventStatus.DEAD if exhausted else EventStatus.RETRYING),
        error=error,
        at=now,
        reason="worker_lost" if exhausted else None,
    )
    if escalating:
        # Out of attempts and the task asks for an operator, as when a worker dies under it.
        escalate(changes, task, event)
        log.warning("task %s/%s escalated: %s", task.workflow_id, task_id, error.message)
    elif exhausted:
        # Parked like a task whose worker died under an unacked message: `fabric dead` sees it.
        changes.parked.append(Park(task, "worker_lost", error, task.attempts, task.agent or ""))
        finish(changes, task, event, TaskStatus.DEAD, now)
        log.warning("task %s/%s parked: %s", task.workflow_id, task_id, error.message)
    else:
        history.remember_failure(task.history, event)
        task.status, task.dispatched, task.lease_s = TaskStatus.QUEUED, False, None
        task.error, task.queued_at, task.retry_at = error.model_dump(), now, None
        changes.touch(task)
        changes.released.append(task)
        log.warning(
            "task %s/%s runs again (attempt %d): %s", task.workflow_id, task_id, attempt + 1, error.message
        )
    history.mark_lapsed(task.history, attempt)
    return True
