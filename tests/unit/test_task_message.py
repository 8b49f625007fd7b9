"""TaskMessage: the task message the router builds and the worker reads and copies (docs/protocol.md §4).

What reaches the broker is pinned byte for byte by tests/integration/test_golden_wire.py; these tests pin
the model's rules without one.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from fabric.errors import ProtocolError
from fabric.protocol import codec
from fabric.protocol import headers as h
from fabric.protocol.task_message import TaskMessage, attempt_id

NOW = 1_700_000_000_000


def first(**changes: Any) -> TaskMessage:
    arguments: dict[str, Any] = {
        "workflow_id": "wf",
        "task_id": "t",
        "attempt": 1,
        "max_attempts": 3,
        "on_exhausted": "park",
        "timeout_s": None,
        "input": {"x": 1},
        "upstream": {"a": 2},
        "priority": 7,
        "dispatched_at_ms": NOW,
    }
    arguments.update(changes)
    return TaskMessage.new(**arguments)


def delivered(table: dict[str, Any], body: bytes = b"\x80", **props: Any) -> TaskMessage:
    return TaskMessage.received(
        table,
        body,
        message_id=props.get("message_id", "wf/t/1"),
        priority=props.get("priority", 4),
        content_type=props.get("content_type"),
    )


def test_the_routers_message() -> None:
    message = first()
    assert dict(message.headers) == {
        h.WORKFLOW_ID: "wf",
        h.TASK_ID: "t",
        h.ATTEMPT: 1,
        h.MAX_ATTEMPTS: 3,
        h.AVOID: [],
        h.DISPATCHED_AT_MS: NOW,
        h.ON_EXHAUSTED: "park",
    }
    assert list(message.headers) == [
        h.WORKFLOW_ID,
        h.TASK_ID,
        h.ATTEMPT,
        h.MAX_ATTEMPTS,
        h.AVOID,
        h.DISPATCHED_AT_MS,
        h.ON_EXHAUSTED,
    ]
    assert message.body == msgpack.packb({"input": {"x": 1}, "upstream": {"a": 2}}, use_bin_type=True)
    assert message.properties() == {
        "headers": dict(message.headers),
        "content_type": codec.MSGPACK,
        "message_id": "wf/t/1",
        "priority": 7,
    }


def test_a_time_limit_is_a_header_only_when_set() -> None:
    assert h.TIMEOUT_S not in first().headers
    assert first(timeout_s=2.5).headers[h.TIMEOUT_S] == 2.5
    assert first(timeout_s=2.5).timeout_s == 2.5


@pytest.mark.parametrize(
    ("table", "attribute", "expected"),
    [
        ({}, "workflow_id", ""),
        ({h.WORKFLOW_ID: b"wf"}, "workflow_id", "wf"),
        ({}, "attempt", 1),
        ({h.ATTEMPT: "3"}, "attempt", 3),
        ({h.ATTEMPT: "x"}, "attempt", 1),
        ({}, "max_attempts", 1),
        ({}, "timeout_s", None),
        ({h.TIMEOUT_S: 1.5}, "timeout_s", 1.5),
        ({}, "avoid", []),
        ({h.AVOID: [b"a", "b"]}, "avoid", ["a", "b"]),
        ({h.AVOID: "a"}, "avoid", ["a"]),
        ({}, "bounces", 0),
        ({h.MUST_AVOID: "true"}, "must_avoid", True),
        ({h.MUST_AVOID: "True"}, "must_avoid", False),
        ({h.MUST_AVOID: True}, "must_avoid", False),
        ({}, "on_exhausted", ""),
        ({h.ON_EXHAUSTED: "escalate"}, "on_exhausted", "escalate"),
        ({}, "dispatched_at_ms", 0),
        ({h.LINKS: {"a": b"00-x"}}, "links", {"a": "00-x"}),
        ({h.LINKS: "nonsense"}, "links", {}),
        ({h.PREVIOUS_ATTEMPT: "00-y"}, "previous_attempt", "00-y"),
    ],
)
def test_reading_a_delivered_message(table: dict[str, Any], attribute: str, expected: Any) -> None:
    assert getattr(delivered(table), attribute) == expected


def test_a_delivered_message_without_content_type_is_msgpack() -> None:
    assert delivered({}).content_type == codec.MSGPACK
    assert delivered({}, content_type=codec.JSON).content_type == codec.JSON


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (codec.encode({"input": 1, "upstream": {"a": 2}}), None, (1, {"a": 2})),
        (codec.encode({"input": 1}), None, (1, {})),
        (codec.encode({"upstream": None}), None, (None, {})),
        (b'{"input":[1],"upstream":{}}', codec.JSON, ([1], {})),
    ],
)
def test_payload(body: bytes, content_type: str | None, expected: Any) -> None:
    assert delivered({}, body, content_type=content_type).payload() == expected


@pytest.mark.parametrize("body", [codec.encode([1, 2]), b"\xc1", codec.encode("text")])
def test_a_malformed_payload_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        delivered({}, body).payload()


def test_handed_on_counts_a_bounce_and_keeps_the_rest() -> None:
    message = delivered({h.ATTEMPT: 2, h.BOUNCES: 4, "other": "kept"}, message_id="wf/t/2", priority=6)
    copy = message.handed_on()
    assert dict(copy.headers) == {h.ATTEMPT: 2, h.BOUNCES: 5, "other": "kept"}
    assert (copy.message_id, copy.priority, copy.body) == ("wf/t/2", 6, message.body)
    assert delivered({}).handed_on().headers[h.BOUNCES] == 1


@pytest.mark.parametrize(
    ("avoid", "expected"), [([], ["me"]), (["x"], ["x", "me"]), (["me", "x"], ["me", "x"])]
)
def test_reassigned(avoid: list[str], expected: list[str]) -> None:
    message = delivered({h.WORKFLOW_ID: "wf", h.TASK_ID: "t", h.ATTEMPT: 2, h.AVOID: avoid, h.BOUNCES: 3})
    copy = message.reassigned("me", now_ms=NOW, previous_attempt=None)
    assert dict(copy.headers) == {
        h.WORKFLOW_ID: "wf",
        h.TASK_ID: "t",
        h.ATTEMPT: 3,
        h.AVOID: expected,
        h.BOUNCES: 0,
        h.MUST_AVOID: "true",
        h.DISPATCHED_AT_MS: NOW,
    }
    assert copy.message_id == "wf/t/3"
    assert copy.priority == message.priority
    assert "expiration_s" not in copy.properties()


@pytest.mark.parametrize(
    ("avoid", "agent", "expected"),
    [([], "me", ["me"]), (["me"], "me", ["me"]), (["x"], "me", ["x", "me"]), (["x"], None, ["x"])],
)
def test_retried(avoid: list[str], agent: str | None, expected: list[str]) -> None:
    message = delivered({h.WORKFLOW_ID: "wf", h.TASK_ID: "t", h.AVOID: avoid, h.MUST_AVOID: "true"})
    copy = message.retried(
        tier="5s",
        delay_ms=4000,
        last_error="E: " + "m" * 2000,
        avoid=agent,
        now_ms=NOW,
        previous_attempt="00-p",
    )
    assert dict(copy.headers) == {
        h.WORKFLOW_ID: "wf",
        h.TASK_ID: "t",
        h.AVOID: expected,
        h.MUST_AVOID: "true",
        h.DELAY: "5s",
        h.ATTEMPT: 2,
        h.BOUNCES: 0,
        h.LAST_ERROR: ("E: " + "m" * 2000)[:1000],
        h.DISPATCHED_AT_MS: NOW + 4000,
        h.PREVIOUS_ATTEMPT: "00-p",
    }
    assert copy.message_id == "wf/t/2"
    assert copy.properties()["expiration_s"] == 4.0


def test_parked_marks_why_and_drops_priority_and_expiration() -> None:
    retried = first().retried(
        tier="1s", delay_ms=1000, last_error="E: m", avoid=None, now_ms=NOW, previous_attempt=None
    )
    parked = retried.parked(
        reason="exhausted", last_error="E: m", routing_key="cap", agent_id="me", now_ms=NOW + 1
    )
    assert parked.headers[h.DEAD_REASON] == "exhausted"
    assert parked.headers[h.ORIGINAL_ROUTING_KEY] == "cap"
    assert parked.headers[h.PARKED_AT_MS] == NOW + 1
    assert parked.headers[h.AGENT_ID] == "me"
    assert parked.headers[h.ATTEMPT] == 2
    assert parked.properties() == {
        "headers": dict(parked.headers),
        "content_type": codec.MSGPACK,
        "message_id": "wf/t/2",
        "priority": 0,
    }


def test_traced_adds_the_context_links_and_previous_attempt() -> None:
    message = first().traced({"traceparent": "00-a"}, links={"d": "00-b"}, previous_attempt="00-c")
    assert list(message.headers)[-3:] == ["traceparent", h.LINKS, h.PREVIOUS_ATTEMPT]
    assert message.links == {"d": "00-b"}
    assert message.previous_attempt == "00-c"
    bare = first().traced({}, links=None, previous_attempt=None)
    assert dict(bare.headers) == dict(first().headers)


def test_copies_never_change_the_original() -> None:
    message = delivered({h.AVOID: ["x"], h.ATTEMPT: 1})
    before = dict(message.headers)
    message.handed_on()
    message.reassigned("me", now_ms=NOW, previous_attempt="00-p")
    message.retried(tier="1s", delay_ms=1, last_error="", avoid="me", now_ms=NOW, previous_attempt=None)
    message.parked(reason="r", last_error="", routing_key="c", agent_id="me", now_ms=NOW)
    assert dict(message.headers) == before


def test_attempt_id() -> None:
    assert attempt_id("wf", "t", 3) == "wf/t/3"
