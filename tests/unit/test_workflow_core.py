"""The workflow state machine (fabric/router/workflow.py), table-driven, no I/O: every task status x
event status x attempt relation, and each operator action."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.protocol.messages import ErrorInfo, EventStatus, TaskEvent, TaskStatus, WorkflowStatus
from fabric.router import actions, history, workflow
from fabric.router.workflow import Changeset, EventVerdict, Incomplete
from fabric.store import TaskRecord, WorkflowRecord

NOW = 1000.0
_ERROR = {"type": "E", "message": "m"}


def _task(task_id: str = "a", **fields: Any) -> TaskRecord:
    return TaskRecord(workflow_id="wf", task_id=task_id, capability="c", **fields)


def _changes(*tasks: TaskRecord, remaining: int | None = None, complete: bool = True) -> Changeset:
    remaining = sum(1 for t in tasks if not t.status.terminal) if remaining is None else remaining
    record = WorkflowRecord(workflow_id="wf", fingerprint="fp", task_count=len(tasks), remaining=remaining)
    return Changeset("wf", {t.task_id: t for t in tasks}, record, complete=complete)


def _event(status: EventStatus, attempt: int, task_id: str = "a", **fields: Any) -> TaskEvent:
    if status in (EventStatus.FAILED, EventStatus.DEAD, EventStatus.RETRYING, EventStatus.ESCALATED):
        fields.setdefault("error", _ERROR)
    return TaskEvent(
        workflow_id="wf",
        task_id=task_id,
        attempt=attempt,
        agent_id=f"w{attempt}",
        status=status,
        at=5.0,
        **fields,
    )


def _apply(changes: Changeset, event: TaskEvent, *, redelivered: bool = False) -> EventVerdict:
    return workflow.apply_event(changes, event, redelivered=redelivered, span=None, now=NOW)


#: The status a task of the current attempt moves to, per event.
_MOVES_TO = {
    EventStatus.STARTED: TaskStatus.RUNNING,
    EventStatus.SUCCEEDED: TaskStatus.SUCCEEDED,
    EventStatus.FAILED: TaskStatus.FAILED,
    EventStatus.DEAD: TaskStatus.DEAD,
    EventStatus.CANCELLED: TaskStatus.CANCELLED,
    EventStatus.RETRYING: TaskStatus.RETRYING,
    EventStatus.REASSIGNED: TaskStatus.RETRYING,
    EventStatus.ESCALATED: TaskStatus.ESCALATED,
}

#: The current attempt of every task in the table; each relation names the event's attempt.
_CURRENT = 2
_RELATIONS = {"current": _CURRENT, "stale": _CURRENT - 1, "lapsed": _CURRENT, "future": _CURRENT + 1}


def _expected(status: TaskStatus, event: EventStatus, relation: str) -> tuple[EventVerdict, TaskStatus]:
    if status.terminal:
        return EventVerdict.LATE, status
    if status is TaskStatus.ESCALATED:
        return EventVerdict.LATE, status
    if relation in ("stale", "lapsed"):
        return EventVerdict.OK, status
    return EventVerdict.OK, _MOVES_TO[event]


_CASES = [
    pytest.param(status, event, relation, id=f"{status}-{event}-{relation}")
    for status in TaskStatus
    for event in EventStatus
    for relation in _RELATIONS
]


@pytest.mark.parametrize(("status", "event_status", "relation"), _CASES)
def test_every_status_event_and_attempt(status: TaskStatus, event_status: EventStatus, relation: str) -> None:
    task = _task(status=status, attempts=_CURRENT, agent="w2")
    if relation == "lapsed":
        task.history = [{"attempt": _CURRENT, "agent": "w2", "error": _ERROR, "at": 1.0, "lapsed": True}]
    history_before = list(task.history)
    changes = _changes(task, _task("b", status=TaskStatus.WAITING, pending_deps=1, depends_on=["a"]))
    task.dependents = ["b"]
    verdict = _apply(changes, _event(event_status, _RELATIONS[relation]))
    expected_verdict, expected_status = _expected(status, event_status, relation)
    assert (verdict, task.status) == (expected_verdict, expected_status)
    if verdict is EventVerdict.LATE or relation in ("stale", "lapsed"):
        assert task.attempts == _CURRENT, "a late or stale event is not the task's attempt"
        assert not changes.released
        assert not changes.workflow_changed
        assert not changes.counts
        if status is not TaskStatus.CANCELLED:
            assert not changes.recalled
        if verdict is EventVerdict.OK and event_status is not EventStatus.STARTED:
            assert task.history[-1]["late"] == str(event_status), "a stale outcome goes to the history"
            assert [n for n in changes.notes] == [], "and notifies nobody"
        else:
            assert task.history == history_before
        return
    assert task.attempts == max(_CURRENT, _RELATIONS[relation])
    assert task.agent == f"w{_RELATIONS[relation]}"
    assert changes.changed["a"] is task
    assert changes.notes[0]["status"] == str(expected_status)
    released = [t.task_id for t in changes.released]
    assert released == (["b"] if expected_status is TaskStatus.SUCCEEDED else [])
    if expected_status.terminal:
        dependent = changes.tasks["b"].status
        assert dependent is {
            TaskStatus.SUCCEEDED: TaskStatus.QUEUED,
            TaskStatus.CANCELLED: TaskStatus.CANCELLED,
        }.get(expected_status, TaskStatus.UPSTREAM_FAILED)
        assert changes.workflow is not None
        assert changes.workflow.remaining == (1 if expected_status is TaskStatus.SUCCEEDED else 0)
    else:
        assert not changes.workflow_changed
    assert (task in changes.escalated) is (expected_status is TaskStatus.ESCALATED)


@pytest.mark.parametrize("status", [s for s in TaskStatus if s.terminal])
@pytest.mark.parametrize("event_status", list(EventStatus))
def test_a_redelivered_event_of_a_finished_task_reconciles(
    status: TaskStatus, event_status: EventStatus
) -> None:
    task = _task(status=status, attempts=1)
    changes = _changes(task)
    assert _apply(changes, _event(event_status, 1), redelivered=True) is EventVerdict.RECONCILE
    assert task.status is status


def test_an_unknown_task_is_unknown() -> None:
    changes = Changeset("wf", absent={"a"})
    assert _apply(changes, _event(EventStatus.STARTED, 1)) is EventVerdict.UNKNOWN


@pytest.mark.parametrize(
    ("event_status", "recall", "broadcast"),
    [
        (EventStatus.CANCELLED, False, False),  # a worker dropped a copy: the flag goes
        (EventStatus.STARTED, True, True),  # a copy reached a worker that did not know
        (EventStatus.SUCCEEDED, True, True),
    ],
)
def test_events_of_a_cancelled_task_recall_its_copies(
    event_status: EventStatus, recall: bool, broadcast: bool
) -> None:
    task = _task(status=TaskStatus.CANCELLED, attempts=1, recall=not recall)
    changes = _changes(task)
    assert _apply(changes, _event(event_status, 1)) is EventVerdict.LATE
    assert (task.recall, changes.recalled == ["a"]) == (recall, broadcast)
    assert changes.changed == {"a": task}
    assert changes.notes == [], "nothing to notify"


def test_a_lease_renewal_and_a_start_are_effects() -> None:
    task = _task(status=TaskStatus.QUEUED)
    changes = _changes(task)
    _apply(changes, _event(EventStatus.STARTED, 1, lease_s=30.0))
    assert (task.lease_s, changes.renewed, changes.counts) == (30.0, [("wf", "a", 1)], [("started", "c")])
    changes = _changes(task)
    _apply(changes, _event(EventStatus.STARTED, 1, lease_s=30.0))
    assert changes.counts == [], "a lease announced for the running attempt is not a new start"


def test_a_retry_is_counted_once_and_ready_again_when_due() -> None:
    task = _task(status=TaskStatus.RUNNING, attempts=1)
    changes = _changes(task)
    _apply(changes, _event(EventStatus.RETRYING, 1, retry_at=9.0))
    _apply(changes, _event(EventStatus.RETRYING, 1, retry_at=9.0))  # redelivered
    assert changes.counts == [("retried", "c")]
    assert changes.queue_ages == [(("wf", "a"), "c", None), (("wf", "a"), "c", 9.0)] * 2, "in order"
    assert (task.retry_at, len(task.history)) == (9.0, 1)


def test_success_releases_a_dependent_once_its_last_dependency_succeeds() -> None:
    a, b = _task("a", status=TaskStatus.RUNNING, attempts=1, dependents=["c"]), _task("b", dependents=["c"])
    b.status, b.attempts = TaskStatus.RUNNING, 1
    c = _task("c", depends_on=["a", "b"], pending_deps=2)
    changes = _changes(a, b, c)
    _apply(changes, _event(EventStatus.SUCCEEDED, 1, "a"))
    assert (c.status, c.pending_deps, changes.released) == (TaskStatus.WAITING, 1, [])
    workflow.apply_event(
        changes, _event(EventStatus.SUCCEEDED, 1, "b"), redelivered=False, span="sp", now=NOW
    )
    assert (c.status, changes.released, c.release, c.queued_at) == (TaskStatus.QUEUED, [c], "sp", NOW)
    assert changes.workflow is not None
    assert changes.workflow.remaining == 1


def test_failure_cascades_through_the_whole_downstream() -> None:
    a = _task("a", status=TaskStatus.RUNNING, attempts=1, dependents=["b"])
    b = _task("b", depends_on=["a"], pending_deps=1, dependents=["c"])
    c = _task("c", depends_on=["b"], pending_deps=1)
    d = _task("d", status=TaskStatus.SUCCEEDED)
    changes = _changes(a, b, c, d)
    _apply(changes, _event(EventStatus.FAILED, 1, "a"))
    assert [t.status for t in (a, b, c)] == [TaskStatus.FAILED, *[TaskStatus.UPSTREAM_FAILED] * 2]
    assert c.error == {"type": "UpstreamFailed", "message": "dependency 'a' ended failed"}
    assert changes.workflow is not None
    assert (changes.workflow.status, changes.workflow.remaining, changes.finished) == (
        WorkflowStatus.FAILED,
        0,
        True,
    )
    assert changes.workflow.finished_at == NOW
    assert changes.counts == [("failed", "c")]
    assert changes.announce


@pytest.mark.parametrize(
    ("ends", "workflow_status"),
    [
        ([TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED], WorkflowStatus.SUCCEEDED),
        ([TaskStatus.SUCCEEDED, TaskStatus.CANCELLED], WorkflowStatus.CANCELLED),
        ([TaskStatus.CANCELLED, TaskStatus.DEAD], WorkflowStatus.FAILED),
        ([TaskStatus.UPSTREAM_FAILED, TaskStatus.SUCCEEDED], WorkflowStatus.FAILED),
        ([TaskStatus.FAILED, TaskStatus.SUCCEEDED], WorkflowStatus.FAILED),
    ],
)
def test_close_workflow_decides_the_final_status(
    ends: list[TaskStatus], workflow_status: WorkflowStatus
) -> None:
    changes = _changes(*(_task(str(i), status=s) for i, s in enumerate(ends)), remaining=1)
    assert changes.workflow is not None
    workflow.close_workflow(changes, changes.workflow, 1, NOW)
    assert (changes.workflow.status, changes.finished, changes.workflow.finished_at) == (
        workflow_status,
        True,
        NOW,
    )


def test_close_workflow_leaves_a_workflow_with_tasks_remaining_running() -> None:
    changes = _changes(_task(status=TaskStatus.SUCCEEDED), remaining=3, complete=False)
    assert changes.workflow is not None
    workflow.close_workflow(changes, changes.workflow, 1, NOW)
    assert (changes.workflow.status, changes.workflow.remaining, changes.finished) == (
        WorkflowStatus.RUNNING,
        2,
        False,
    )


def test_a_decision_needing_unloaded_records_says_so() -> None:
    task = _task(status=TaskStatus.RUNNING, attempts=1, dependents=["b"])
    changes = _changes(task, remaining=2, complete=False)
    with pytest.raises(Incomplete):
        _apply(changes, _event(EventStatus.SUCCEEDED, 1))
    changes = Changeset("wf", {"a": _task(status=TaskStatus.RUNNING, attempts=1)})
    with pytest.raises(Incomplete):
        _apply(changes, _event(EventStatus.FAILED, 1))  # no workflow record loaded
    a = _task("a", status=TaskStatus.RUNNING, attempts=1, dependents=["b"])
    b = _task("b", depends_on=["a"], pending_deps=1, dependents=["c"])
    changes = _changes(a, b, remaining=3, complete=False)
    with pytest.raises(Incomplete):
        _apply(changes, _event(EventStatus.FAILED, 1))  # the cascade goes on to c, not loaded


@pytest.mark.parametrize(
    ("status", "event_status", "needs"),
    [
        (TaskStatus.RUNNING, EventStatus.STARTED, workflow.Needs()),
        (TaskStatus.RUNNING, EventStatus.RETRYING, workflow.Needs()),
        (TaskStatus.RUNNING, EventStatus.ESCALATED, workflow.Needs()),
        (TaskStatus.RUNNING, EventStatus.SUCCEEDED, workflow.Needs(workflow=True, ids=frozenset({"b"}))),
        (TaskStatus.RUNNING, EventStatus.FAILED, workflow.Needs(workflow=True, ids=frozenset({"b"}))),
        (TaskStatus.RUNNING, EventStatus.CANCELLED, workflow.Needs(workflow=True, ids=frozenset({"b"}))),
        (TaskStatus.SUCCEEDED, EventStatus.FAILED, workflow.Needs()),  # finished: stays so
        (TaskStatus.ESCALATED, EventStatus.FAILED, workflow.Needs()),  # only an operator moves it
    ],
)
def test_what_a_batch_loads(status: TaskStatus, event_status: EventStatus, needs: workflow.Needs) -> None:
    task = _task(status=status, attempts=1, dependents=["b"])
    assert workflow.needs([_event(event_status, 1)], {"a": task}) == needs


def test_a_batch_that_may_end_the_last_tasks_loads_everything() -> None:
    record = WorkflowRecord(workflow_id="wf", fingerprint="fp", task_count=3, remaining=2)
    one = [_event(EventStatus.SUCCEEDED, 1)]
    assert not workflow.may_finish(one, record)
    assert workflow.may_finish([*one, _event(EventStatus.SUCCEEDED, 1, "b")], record)


# -- leases, router failures, operators -------------------------------------------------------------


def _leased(**fields: Any) -> TaskRecord:
    return _task(**{"status": TaskStatus.RUNNING, "attempts": 1, "agent": "w1", "lease_s": 3.0, **fields})


@pytest.mark.parametrize(
    ("max_attempts", "on_exhausted", "status", "parked"),
    [
        (3, "park", TaskStatus.QUEUED, False),
        (1, "park", TaskStatus.DEAD, True),
        (1, "escalate", TaskStatus.ESCALATED, False),
    ],
)
def test_a_lapsed_lease(max_attempts: int, on_exhausted: str, status: TaskStatus, parked: bool) -> None:
    task = _leased(max_attempts=max_attempts, on_exhausted=on_exhausted)
    changes = _changes(task)
    assert workflow.lapse(changes, "a", 1, NOW)
    assert (task.status, task.lease_s, bool(changes.parked)) == (status, None, parked)
    assert [(e["attempt"], e["error"]["type"], e.get("lapsed")) for e in task.history] == [
        (1, "WorkerLost", True)
    ]
    assert history.lapsed_attempts(task.history) == {1}
    assert changes.released == ([task] if status is TaskStatus.QUEUED else [])
    if parked:
        assert (changes.parked[0].reason, changes.parked[0].attempt) == ("worker_lost", 1)
        assert changes.workflow is not None
        assert changes.workflow.status is WorkflowStatus.FAILED
    if status is TaskStatus.ESCALATED:
        assert task.escalation is not None
        assert task.escalation["reason"] == "worker_lost"


@pytest.mark.parametrize(
    "task",
    [
        _leased(status=TaskStatus.SUCCEEDED),  # an event overtook the check
        _leased(attempts=2),
        _leased(lease_s=None),
    ],
)
def test_a_lapse_overtaken_changes_nothing(task: TaskRecord) -> None:
    changes = _changes(task)
    assert not workflow.lapse(changes, "a", 1, NOW)
    assert not changes.dirty


def test_a_task_the_router_fails_ends_its_workflow() -> None:
    task = _task(status=TaskStatus.QUEUED, dependents=["b"])
    changes = _changes(task, _task("b", depends_on=["a"], pending_deps=1))
    workflow.fail(changes, task, ErrorInfo(type="TopologyMismatch", message="x"), NOW)
    assert (task.status, task.attempts, task.agent) == (TaskStatus.FAILED, 1, "router")
    assert changes.tasks["b"].status is TaskStatus.UPSTREAM_FAILED
    assert changes.workflow is not None
    assert changes.workflow.status is WorkflowStatus.FAILED


def test_cancel_a_task_and_its_downstream() -> None:
    a = _task("a", status=TaskStatus.RUNNING, attempts=1, dependents=["b"])
    b = _task("b", depends_on=["a"], dependents=["c"])
    c = _task("c", status=TaskStatus.ESCALATED, depends_on=["b"])
    d = _task("d", status=TaskStatus.QUEUED)
    changes = _changes(a, b, c, d)
    assert actions.cancel(changes, "a", NOW) == ["a", "b", "c"]
    assert [t.status for t in (a, b, c, d)] == [TaskStatus.CANCELLED] * 3 + [TaskStatus.QUEUED]
    assert [a.recall, b.recall, c.recall] == [True, False, False], "only copies that may be out"
    assert changes.recalled == ["a", "b", "c"]
    assert [r.task_id for r in changes.resolved] == ["c"], "the escalation alert is resolved"
    assert changes.workflow is not None
    assert changes.workflow.remaining == 1
    assert actions.cancel(changes, None, NOW) == ["d"]
    assert changes.workflow.status is WorkflowStatus.CANCELLED
    with pytest.raises(KeyError):
        actions.cancel(changes, "nope", NOW)


def test_replay_revives_the_downstream_and_reopens_the_workflow() -> None:
    a = _task("a", status=TaskStatus.DEAD, attempts=3, dependents=["b"], error=_ERROR)
    b = _task("b", status=TaskStatus.UPSTREAM_FAILED, depends_on=["a"], dependents=["c"])
    c = _task("c", status=TaskStatus.UPSTREAM_FAILED, depends_on=["b"])
    changes = _changes(a, b, c, remaining=0)
    assert changes.workflow is not None
    changes.workflow.status = WorkflowStatus.FAILED
    assert actions.replay(changes, "a", NOW) == ["a", "b", "c"]
    assert (a.status, a.attempts, a.error, changes.released) == (TaskStatus.QUEUED, 0, None, [a])
    assert (b.status, b.pending_deps, c.pending_deps) == (TaskStatus.WAITING, 1, 1)
    assert (changes.workflow.status, changes.workflow.remaining) == (WorkflowStatus.RUNNING, 3)
    assert a.history[-1] == {
        "attempt": 3,
        "agent": "operator",
        "error": {"type": "Replayed", "message": "replayed after 3 attempt(s)"},
        "at": NOW,
    }
    with pytest.raises(ValueError, match="only dead or failed"):
        actions.replay(changes, "a", NOW)


def test_resume_starts_a_new_attempt_epoch() -> None:
    task = _task(status=TaskStatus.ESCALATED, attempts=1, escalation={"reason": "worker_lost"})
    task.history = [{"attempt": 1, "agent": "w1", "error": _ERROR, "at": 1.0, "lapsed": True}]
    changes = _changes(task)
    actions.resume(changes, "a", NOW, new_input={"x": 1})
    assert (task.status, task.attempts, task.escalation, task.input) == (TaskStatus.QUEUED, 0, None, {"x": 1})
    assert task.history[-1]["input"] == {"x": 1}
    assert (
        task.history[-1]["error"]["message"] == "resumed by an operator after 1 attempt(s) with a new input"
    )
    assert history.lapsed_attempts(task.history) == set()
    assert _apply(changes, _event(EventStatus.STARTED, 1)) is EventVerdict.OK
    assert task.status is TaskStatus.RUNNING, "the new attempt 1 is not the lapsed one"
    with pytest.raises(ValueError, match="not escalated"):
        actions.resume(changes, "a", NOW)
    with pytest.raises(KeyError):
        actions.resume(changes, "nope", NOW)


def test_abort_parks_a_copy_and_fails_the_downstream() -> None:
    a = _task("a", status=TaskStatus.ESCALATED, attempts=2, dependents=["b"], escalation={"reason": "x"})
    changes = _changes(a, _task("b", depends_on=["a"], pending_deps=1))
    actions.abort(changes, "a", "no", NOW)
    assert (a.status, a.escalation, changes.tasks["b"].status) == (
        TaskStatus.DEAD,
        None,
        TaskStatus.UPSTREAM_FAILED,
    )
    assert [(p.reason, p.attempt, p.agent) for p in changes.parked] == [("no", 2, "operator")]
    assert [e["error"]["type"] for e in a.history] == ["Aborted", "Aborted"]
    assert history.decode(a.history[-1]) == history.OperatorAction(2, "Aborted", "no", NOW)
    assert changes.workflow is not None
    assert changes.workflow.status is WorkflowStatus.FAILED


# -- history entries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        {"attempt": 1, "agent": "w1", "error": _ERROR, "at": 1.0},
        {"attempt": 1, "agent": "w1", "error": _ERROR, "at": 1.0, "lapsed": True},
        {"attempt": 1, "agent": "w1", "late": "succeeded", "error": None, "at": 1.0},
        {"attempt": 2, "agent": "operator", "error": {"type": "Resumed", "message": "m"}, "at": 1.0},
        {
            "attempt": 2,
            "agent": "operator",
            "error": {"type": "Resumed", "message": "m"},
            "at": 1.0,
            "input": None,
        },
    ],
)
def test_history_entries_keep_the_stored_form(stored: dict[str, Any]) -> None:
    encoded = history.decode(stored).encode()
    assert encoded == stored
    assert list(encoded) == list(stored), "same keys, same order"
