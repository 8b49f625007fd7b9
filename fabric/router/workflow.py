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
* the operator's :func:`cancel`, :func:`replay`, :func:`resume` and :func:`abort`.

A decision that needs a record the shell did not load raises :class:`Incomplete`; the shell loads the
whole workflow and decides again on fresh records (:func:`needs` tells it what to load first).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent, TaskStatus, WorkflowStatus
from fabric.router import history
from fabric.router.recall import recall_after, recall_on_cancel
from fabric.store.base import TaskRecord, WorkflowRecord

if TYPE_CHECKING:
    from fabric.metrics import TaskCounter

log = logging.getLogger("fabric.router")

#: Task states that make a workflow end ``failed``.
FAILED_STATES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.UPSTREAM_FAILED})

#: The task counter a final state moves (upstream_failed and cancelled tasks never ran to an end).
_FINAL_COUNTERS: dict[TaskStatus, TaskCounter] = {
    TaskStatus.SUCCEEDED: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.DEAD: "parked",
}

#: Event statuses that end a task.
_ENDING = frozenset({EventStatus.SUCCEEDED, EventStatus.FAILED, EventStatus.DEAD, EventStatus.CANCELLED})


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
    everything: bool = False


def needs(events: Sequence[TaskEvent], tasks: dict[str, TaskRecord]) -> Needs:
    """What applying ``events`` may read besides their tasks (``tasks``, as loaded): the workflow and
    the dependents of a task that may succeed, everything for one that may fail (its cascade) or end
    the workflow. Over-approximates (staleness is not judged here); :class:`Incomplete` covers the rest.
    """
    workflow = everything = False
    ids: set[str] = set()
    for event in events:
        task = tasks.get(event.task_id)
        if task is None or task.status.terminal or task.status is TaskStatus.ESCALATED:
            continue  # stays so for the whole batch: the event changes nothing that needs more
        if event.status is EventStatus.SUCCEEDED:
            workflow = True
            ids.update(task.dependents)
        elif event.status in _ENDING:
            workflow = everything = True
    return Needs(workflow, frozenset(ids), everything)


def may_finish(events: Sequence[TaskEvent], workflow: WorkflowRecord) -> bool:
    """Whether ``events`` may end every remaining task (then closing the workflow reads every task)."""
    return sum(1 for e in events if e.status in _ENDING) >= workflow.remaining


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


# -- operator actions -----------------------------------------------------------------------------


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
