"""admit(): every refusal reachable without a broker, workflow ids, fingerprints and the records made."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from fabric.protocol.messages import RejectReason, TaskStatus
from fabric.router.admission import Admitted, Refusal, admit

JSON = "application/json"
MSGPACK = "application/msgpack"

DIAMOND: dict[str, Any] = {
    "tasks": [
        {"id": "a", "capability": "demo.sum", "input": 1},
        {"id": "b", "capability": "demo.sum", "input": [2, 3], "depends_on": ["a"], "max_attempts": 7},
        {"id": "c", "capability": "demo.echo", "input": {"k": "v"}, "depends_on": ["a", "a"], "priority": 9},
        {"id": "d", "capability": "demo.sum", "depends_on": ["b", "c", "b"], "timeout_s": 2.5},
    ]
}


def _body(document: Any, content_type: str = JSON) -> bytes:
    if content_type.startswith(JSON):
        return json.dumps(document).encode()
    return msgpack.packb(document, use_bin_type=True)


def _admit(
    body: bytes,
    content_type: str | None = JSON,
    *,
    message_id: str | None = "m-1",
    max_body_bytes: int = 1 << 20,
    max_tasks: int = 100,
    default_max_attempts: int = 3,
) -> Admitted:
    return admit(
        body,
        content_type,
        message_id=message_id,
        reply_to="replies",
        correlation_id="corr",
        max_body_bytes=max_body_bytes,
        max_tasks=max_tasks,
        default_max_attempts=default_max_attempts,
    )


def _refusal(body: bytes, content_type: str | None = JSON, **limits: Any) -> Refusal:
    with pytest.raises(Refusal) as info:
        _admit(body, content_type, **limits)
    return info.value


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/xml", "application/jsonx"])
def test_unsupported_content_type(content_type: str | None) -> None:
    refusal = _refusal(_body(DIAMOND), content_type)

    assert refusal.reason is RejectReason.UNSUPPORTED_CONTENT_TYPE
    assert repr(content_type) in refusal.detail
    assert refusal.workflow_id is None


def test_too_large_is_checked_before_decoding() -> None:
    body = b"x" * 2048

    refusal = _refusal(body, max_body_bytes=2047)

    assert refusal.reason is RejectReason.TOO_LARGE
    assert "2048" in refusal.detail
    assert "2047" in refusal.detail


def test_body_at_the_limit_is_not_too_large() -> None:
    body = _body(DIAMOND)

    assert _admit(body, max_body_bytes=len(body)).workflow.task_count == 4


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"tasks": [', JSON),
        (b"\xff\xfe", JSON),
        (b"", JSON),
        (b"\xc1", MSGPACK),
        (b"\x92\x01", MSGPACK),
        (b"\x01\x02", MSGPACK),
    ],
    ids=[
        "json-truncated",
        "json-not-utf8",
        "json-empty",
        "msgpack-reserved-byte",
        "msgpack-truncated",
        "msgpack-extra",
    ],
)
def test_malformed_bytes(body: bytes, content_type: str) -> None:
    refusal = _refusal(body, content_type)

    assert refusal.reason is RejectReason.MALFORMED
    assert refusal.detail.startswith(f"malformed {content_type} body")


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    """100 KB of ``[`` is within the size limit; the router must refuse it, not die in the decoder."""
    refusal = _refusal(b"[" * 100_000, JSON)

    assert refusal.reason is RejectReason.MALFORMED


@pytest.mark.parametrize("document", [[1, 2], "tasks", 3, None])
@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_body_that_is_not_an_object_is_malformed(document: Any, content_type: str) -> None:
    refusal = _refusal(_body(document, content_type), content_type)

    assert refusal.reason is RejectReason.MALFORMED
    assert "map/object" in refusal.detail


def test_invalid_submission_carries_structured_errors() -> None:
    document = {
        "workflow_id": "wf-hint",
        "tasks": [
            {"id": "ok", "capability": "demo.echo"},
            {"id": "bad id", "capability": "Upper", "priority": 10},
        ],
        "unexpected": 1,
    }

    refusal = _refusal(_body(document))

    assert refusal.reason is RejectReason.INVALID
    assert refusal.workflow_id == "wf-hint"
    by_loc = {error["loc"]: error for error in refusal.errors}
    assert set(by_loc) == {"tasks.1.id", "tasks.1.capability", "tasks.1.priority", "unexpected"}
    assert by_loc["tasks.1.priority"]["type"] == "less_than_equal"
    assert by_loc["tasks.1.id"]["type"] == "string_pattern_mismatch"
    assert by_loc["unexpected"]["type"] == "extra_forbidden"
    assert all(set(error) == {"loc", "msg", "type"} and error["msg"] for error in refusal.errors)
    assert "tasks.1.priority" in refusal.detail


def test_missing_tasks_is_invalid() -> None:
    refusal = _refusal(_body({"metadata": {}}))

    assert refusal.reason is RejectReason.INVALID
    assert refusal.errors == ({"loc": "tasks", "msg": "Field required", "type": "missing"},)
    assert refusal.workflow_id is None


def test_empty_task_list_is_invalid() -> None:
    refusal = _refusal(_body({"tasks": []}))

    assert refusal.reason is RejectReason.INVALID
    assert [error["loc"] for error in refusal.errors] == ["tasks"]


def test_invalid_detail_summarises_at_most_five_errors() -> None:
    tasks = [{"id": f"t{i}", "capability": "BAD"} for i in range(7)]

    refusal = _refusal(_body({"tasks": tasks}))

    assert len(refusal.errors) == 7
    assert refusal.detail.endswith("(and 2 more)")
    assert refusal.detail.count("tasks.") == 5


def test_more_tasks_than_max_tasks_is_invalid() -> None:
    tasks = [{"id": f"t{i}", "capability": "demo.echo"} for i in range(4)]
    body = _body({"workflow_id": "big", "tasks": tasks})

    refusal = _refusal(body, max_tasks=3)

    assert refusal.reason is RejectReason.INVALID
    assert refusal.workflow_id == "big"
    assert "4 tasks" in refusal.detail
    assert "3" in refusal.detail
    assert _admit(body, max_tasks=4).workflow.task_count == 4


def test_duplicate_task_id() -> None:
    body = _body(
        {"workflow_id": "w", "tasks": [{"id": "a", "capability": "x"}, {"id": "a", "capability": "x"}]}
    )

    refusal = _refusal(body)

    assert refusal.reason is RejectReason.DUPLICATE_TASK_ID
    assert refusal.workflow_id == "w"
    assert "a" in refusal.detail


def test_unknown_dependency() -> None:
    refusal = _refusal(_body({"tasks": [{"id": "a", "capability": "x", "depends_on": ["ghost"]}]}))

    assert refusal.reason is RejectReason.UNKNOWN_DEPENDENCY
    assert "a -> ghost" in refusal.detail


def test_cycle() -> None:
    tasks = [
        {"id": "a", "capability": "x", "depends_on": ["c"]},
        {"id": "b", "capability": "x", "depends_on": ["a"]},
        {"id": "c", "capability": "x", "depends_on": ["b"]},
    ]

    refusal = _refusal(_body({"tasks": tasks}, MSGPACK), MSGPACK)

    assert refusal.reason is RejectReason.CYCLE
    assert refusal.detail.startswith("dependency cycle: ")
    assert set(refusal.detail.removeprefix("dependency cycle: ").split(" -> ")) == {"a", "b", "c"}


# --- workflow ids and fingerprints ------------------------------------------------------------------------


def test_same_message_id_derives_the_same_workflow_id() -> None:
    first = _admit(_body(DIAMOND), message_id="resent")
    second = _admit(_body(DIAMOND, MSGPACK), MSGPACK, message_id="resent")
    other = _admit(_body(DIAMOND), message_id="another")

    assert first.workflow.workflow_id == second.workflow.workflow_id
    assert first.workflow.workflow_id != other.workflow.workflow_id
    assert first.workflow.workflow_id.startswith("wf-")


@pytest.mark.parametrize("message_id", [None, ""])
def test_no_message_id_gives_distinct_random_workflow_ids(message_id: str | None) -> None:
    ids = {_admit(_body(DIAMOND), message_id=message_id).workflow.workflow_id for _ in range(5)}

    assert len(ids) == 5
    assert all(workflow_id.startswith("wf-") for workflow_id in ids)


def test_explicit_workflow_id_wins_over_message_id() -> None:
    admitted = _admit(_body({"workflow_id": "mine:1", **DIAMOND}), message_id="m-1")

    assert admitted.workflow.workflow_id == "mine:1"
    assert {task.workflow_id for task in admitted.tasks} == {"mine:1"}


def test_fingerprint_is_the_same_in_json_and_msgpack() -> None:
    as_json = _admit(_body(DIAMOND, JSON), JSON)
    as_msgpack = _admit(_body(DIAMOND, MSGPACK), MSGPACK)

    assert as_json.workflow.fingerprint == as_msgpack.workflow.fingerprint


def test_fingerprint_ignores_workflow_id_but_not_tasks() -> None:
    base = _admit(_body(DIAMOND)).workflow.fingerprint
    named = _admit(_body({"workflow_id": "named", **DIAMOND})).workflow.fingerprint
    changed = json.loads(json.dumps(DIAMOND))
    changed["tasks"][0]["input"] = 2

    assert named == base
    assert _admit(_body(changed)).workflow.fingerprint != base


# --- records ----------------------------------------------------------------------------------------------


def test_records_of_a_diamond() -> None:
    admitted = _admit(_body(DIAMOND), default_max_attempts=4)
    tasks = {task.task_id: task for task in admitted.tasks}

    assert [task.task_id for task in admitted.ready] == ["a"]
    a, b, c, d = tasks["a"], tasks["b"], tasks["c"], tasks["d"]
    assert a.status is TaskStatus.QUEUED
    assert a.queued_at is not None
    assert a.pending_deps == 0
    for waiting in (b, c, d):
        assert waiting.status is TaskStatus.WAITING
        assert waiting.queued_at is None
    # Duplicate entries in depends_on count once.
    assert (b.pending_deps, c.pending_deps, d.pending_deps) == (1, 1, 2)
    assert c.depends_on == ["a"]
    assert d.depends_on == ["b", "c"]
    assert sorted(a.dependents) == ["b", "c"]
    assert b.dependents == ["d"]
    assert c.dependents == ["d"]
    assert d.dependents == []
    assert (a.max_attempts, b.max_attempts) == (4, 7)
    assert (a.priority, c.priority) == (5, 9)
    assert (a.timeout_s, d.timeout_s) == (None, 2.5)
    assert c.input == {"k": "v"}
    assert {task.capability for task in admitted.tasks} == {"demo.sum", "demo.echo"}


def test_workflow_record() -> None:
    body = _body({"metadata": {"team": "search"}, **DIAMOND})

    workflow = _admit(body, "application/json; charset=utf-8", message_id="m-9").workflow

    assert workflow.content_type == "application/json"
    assert (workflow.task_count, workflow.remaining) == (4, 4)
    assert workflow.metadata == {"team": "search"}
    assert (workflow.reply_to, workflow.correlation_id, workflow.message_id) == ("replies", "corr", "m-9")
    assert str(workflow.status) == "running"


@pytest.mark.parametrize("alias", ["application/x-msgpack", "application/vnd.msgpack", "Application/MsgPack"])
def test_msgpack_aliases_normalise(alias: str) -> None:
    workflow = _admit(_body(DIAMOND, MSGPACK), alias).workflow

    assert workflow.content_type == MSGPACK
