"""Properties of the workflow state machine over random DAGs and random event orders (no I/O).

Workers' events arrive in any order, duplicated and late; operators step in. Whatever happens, every
task ends in exactly one terminal state and never leaves it, ``remaining`` counts the unfinished tasks,
each dependent is released once, and the workflow's final status follows from its tasks'.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.protocol.messages import EventStatus, TaskEvent, TaskStatus, WorkflowStatus
from fabric.router import actions, workflow
from fabric.router.workflow import Changeset
from fabric.store import TaskRecord, WorkflowRecord

#: What a worker may report about a task it runs (an outcome, or the start).
_WORKER_EVENTS = [
    EventStatus.STARTED,
    EventStatus.SUCCEEDED,
    EventStatus.SUCCEEDED,
    EventStatus.FAILED,
    EventStatus.RETRYING,
    EventStatus.REASSIGNED,
    EventStatus.DEAD,
    EventStatus.ESCALATED,
    EventStatus.CANCELLED,
]


@st.composite
def dags(draw: st.DrawFn) -> dict[str, TaskRecord]:
    """A random DAG: each task depends on some of the tasks before it."""
    size = draw(st.integers(min_value=1, max_value=12))
    tasks: dict[str, TaskRecord] = {}
    for index in range(size):
        task_id = f"t{index}"
        deps = sorted(draw(st.sets(st.sampled_from(list(tasks)), max_size=3))) if tasks else []
        tasks[task_id] = TaskRecord(
            workflow_id="wf",
            task_id=task_id,
            capability="c",
            depends_on=deps,
            pending_deps=len(deps),
            status=TaskStatus.WAITING if deps else TaskStatus.QUEUED,
            max_attempts=3,
        )
        for dep in deps:
            tasks[dep].dependents.append(task_id)
    return tasks


def _event(task: TaskRecord, status: EventStatus, attempt: int, at: float) -> TaskEvent:
    error = (
        {"type": "E", "message": "m"} if status not in (EventStatus.STARTED, EventStatus.SUCCEEDED) else None
    )
    return TaskEvent(
        workflow_id="wf",
        task_id=task.task_id,
        attempt=attempt,
        agent_id="w",
        status=status,
        at=at,
        error=error,
        result=task.task_id if status is EventStatus.SUCCEEDED else None,
    )


def _next_attempt(task: TaskRecord) -> int:
    """The attempt a worker reports: the running one, or the next one of a queued or retrying task."""
    return max(task.attempts, 1) if task.status is TaskStatus.RUNNING else task.attempts + 1


class _Run:
    """The shell's part, in memory: one changeset per step, saved by keeping its records."""

    def __init__(self, tasks: dict[str, TaskRecord]) -> None:
        self.tasks = tasks
        self.workflow = WorkflowRecord(
            workflow_id="wf", fingerprint="fp", task_count=len(tasks), remaining=len(tasks)
        )
        self.released: Counter[str] = Counter()
        self.finished = 0
        self.terminal: dict[str, TaskStatus] = {}
        self.sent: list[TaskEvent] = []
        self.clock = 10.0

    def step(self, decide: Any) -> Changeset:
        changes = Changeset("wf", self.tasks, self.workflow, complete=True)
        self.clock += 1.0
        decide(changes, self.clock)
        self.check(changes)
        return changes

    def event(self, event: TaskEvent, *, redelivered: bool) -> None:
        changes = self.step(
            lambda c, now: workflow.apply_event(c, event, redelivered=redelivered, span=None, now=now)
        )
        # A worker's event releases only dependents (an operator's resume releases the task itself).
        for task in changes.released:
            assert task.task_id != event.task_id
            self.released[task.task_id] += 1

    def check(self, changes: Changeset) -> None:
        self.finished += changes.finished
        for task_id, status in self.terminal.items():
            assert self.tasks[task_id].status is status, f"{task_id} left its terminal state {status}"
        for task in self.tasks.values():
            if task.status.terminal:
                self.terminal.setdefault(task.task_id, task.status)
        unfinished = sum(1 for t in self.tasks.values() if not t.status.terminal)
        assert self.workflow.remaining == unfinished
        assert self.workflow.status.terminal is (unfinished == 0)


@settings(max_examples=300, deadline=None)
@given(tasks=dags(), data=st.data())
def test_every_task_ends_once_and_every_dependent_is_released_once(
    tasks: dict[str, TaskRecord], data: st.DataObject
) -> None:
    run = _Run(tasks)
    for _ in range(60):  # random steps, then the drain below ends what is left
        if run.workflow.status.terminal:
            break
        live = [
            t
            for t in tasks.values()
            if t.status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING)
        ]
        escalated = [t for t in tasks.values() if t.status is TaskStatus.ESCALATED]
        choice = data.draw(st.integers(min_value=0, max_value=9))
        if escalated and (not live or choice == 0):
            task = data.draw(st.sampled_from(escalated))
            if data.draw(st.booleans()):
                run.step(lambda c, now, t=task: actions.resume(c, t.task_id, now))
            else:
                run.step(lambda c, now, t=task: actions.abort(c, t.task_id, "no", now))
        elif run.sent and choice == 1:
            # A duplicate or late event (redelivered, or from an attempt overtaken since).
            run.event(data.draw(st.sampled_from(run.sent)), redelivered=True)
        elif choice == 2 and len(tasks) > 1:
            task_id = data.draw(st.sampled_from(sorted(tasks)))
            run.step(lambda c, now, t=task_id: actions.cancel(c, t, now))
        elif live:
            task = data.draw(st.sampled_from(live))
            status = data.draw(st.sampled_from(_WORKER_EVENTS))
            run.event(_event(task, status, _next_attempt(task), run.clock), redelivered=False)
    for _ in range(len(tasks) * 2):  # the drain: each live task succeeds, each escalated one is aborted
        for task in list(tasks.values()):
            if task.status is TaskStatus.ESCALATED:
                run.step(lambda c, now, t=task: actions.abort(c, t.task_id, "no", now))
            elif task.status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING):
                run.event(
                    _event(task, EventStatus.SUCCEEDED, _next_attempt(task), run.clock), redelivered=False
                )
    # Every task ended in exactly one terminal state.
    assert all(t.status.terminal for t in tasks.values())
    assert set(run.terminal) == set(tasks)
    assert run.workflow.remaining == 0
    assert run.finished == 1, "the workflow closed once"
    # Each dependent was released at most once, and only when its every dependency succeeded.
    assert all(count == 1 for count in run.released.values()), run.released
    for task_id in run.released:
        assert all(tasks[d].status is TaskStatus.SUCCEEDED for d in tasks[task_id].depends_on)
    statuses = {t.status for t in tasks.values()}
    expected = (
        WorkflowStatus.FAILED
        if statuses & workflow.FAILED_STATES
        else WorkflowStatus.CANCELLED
        if TaskStatus.CANCELLED in statuses
        else WorkflowStatus.SUCCEEDED
    )
    assert run.workflow.status is expected
    # A task that succeeded ran all its dependencies to success first.
    for task in tasks.values():
        if task.status is TaskStatus.SUCCEEDED:
            assert all(tasks[d].status is TaskStatus.SUCCEEDED for d in task.depends_on)


@settings(max_examples=200, deadline=None)
@given(tasks=dags(), data=st.data())
def test_replaying_a_failed_task_reopens_exactly_what_it_failed(
    tasks: dict[str, TaskRecord], data: st.DataObject
) -> None:
    """Fail one task of a finished-by-failure workflow, replay it: the workflow runs again with
    ``remaining`` matching its unfinished tasks, and every revived task waits on the right count."""
    run = _Run(tasks)
    first = tasks["t0"]
    run.event(_event(first, EventStatus.FAILED, 1, run.clock), redelivered=False)
    for task in list(tasks.values()):
        if not task.status.terminal:
            ends = data.draw(st.sampled_from([EventStatus.SUCCEEDED, EventStatus.CANCELLED]))
            if task.status is TaskStatus.WAITING:
                run.step(lambda c, now, t=task: actions.cancel(c, t.task_id, now))
            else:
                run.event(_event(task, ends, 1, run.clock), redelivered=False)
    assert run.workflow.status is WorkflowStatus.FAILED
    changes = Changeset("wf", tasks, run.workflow, complete=True)
    revived = actions.replay(changes, "t0", 100.0)
    assert run.workflow.status is WorkflowStatus.RUNNING
    assert run.workflow.remaining == sum(1 for t in tasks.values() if not t.status.terminal)
    assert "t0" in revived
    for task_id in revived:
        task = tasks[task_id]
        if task.status is TaskStatus.WAITING:
            assert task.pending_deps == sum(
                1 for d in task.depends_on if tasks[d].status is not TaskStatus.SUCCEEDED
            )
