"""The router's query table (fabric.router.rpc) and the error vocabulary of its answers
(fabric.protocol.rpc), without a broker; and a client reading answers of either router version."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import pytest

from fabric import FabricClient, RequestRefused, TransportError
from fabric.errors import ProtocolError, StoreError
from fabric.protocol import codec
from fabric.protocol.rpc import LEGACY_ERROR_TYPES, RpcErrorType, error_type
from fabric.router.rpc import Refused, Rpc, error_of, optional, param, required
from fabric.settings import FabricSettings
from fabric.store.base import WorkflowRecord


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Refused(RpcErrorType.CONFLICT, "not now"), {"type": "conflict", "message": "not now"}),
        (
            KeyError("workflow w has no task 'x'"),
            {"type": "not_found", "message": "workflow w has no task 'x'"},
        ),
        (ValueError("task a is queued"), {"type": "conflict", "message": "task a is queued"}),
        (ProtocolError("request must be a map"), {"type": "invalid", "message": "request must be a map"}),
        (StoreError("database is locked"), {"type": "unavailable", "message": "database is locked"}),
        (RuntimeError("bug"), {"type": "internal", "message": "RuntimeError: bug"}),
    ],
)
def test_an_exception_maps_to_one_stable_error_type(exc: BaseException, expected: dict[str, str]) -> None:
    assert error_of(exc) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[(str(kind), kind) for kind in RpcErrorType],
        ("KeyError", RpcErrorType.NOT_FOUND),
        ("ValueError", RpcErrorType.CONFLICT),
        ("ProtocolError", RpcErrorType.INVALID),
        ("StoreError", RpcErrorType.UNAVAILABLE),
        ("InternalError", RpcErrorType.INTERNAL),
        ("Gremlin", None),
        (None, None),
        (7, None),
    ],
)
def test_a_received_error_type_is_read_in_either_vocabulary(
    raw: object, expected: RpcErrorType | None
) -> None:
    assert error_type(raw) is expected


def test_refusals_are_what_the_router_understood_and_refused() -> None:
    refusals = {kind for kind in RpcErrorType if kind.refusal}
    assert refusals == {RpcErrorType.NOT_FOUND, RpcErrorType.INVALID, RpcErrorType.CONFLICT}
    assert set(LEGACY_ERROR_TYPES.values()) == set(RpcErrorType)


@pytest.mark.parametrize(
    ("call", "request_", "expected"),
    [
        (param, {"task_id": "a"}, "a"),
        (param, {"task_id": 7}, "7"),
        (param, {}, Refused),
        (required, {"task_id": "a"}, "a"),
        (required, {"task_id": ""}, Refused),
        (required, {"task_id": 7}, Refused),
        (required, {}, Refused),
        (optional, {}, None),
        (optional, {"task_id": "a"}, "a"),
        (optional, {"task_id": 5}, Refused),
    ],
)
def test_request_parameters(call: Any, request_: dict[str, Any], expected: object) -> None:
    if expected is Refused:
        with pytest.raises(Refused) as refused:
            call(request_, "task_id")
        assert refused.value.type is RpcErrorType.INVALID
    else:
        assert call(request_, "task_id") == expected


WORKFLOW = WorkflowRecord(workflow_id="wf-1", fingerprint="fp", task_count=1, remaining=1)


class Table:
    def __init__(self) -> None:
        self.replies: list[tuple[str | None, str | None, dict[str, Any], str]] = []

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        return WORKFLOW if workflow_id == WORKFLOW.workflow_id else None

    async def ping(self, request: Mapping[str, Any]) -> Any:
        return {"pong": dict(request)}

    async def status(self, workflow: WorkflowRecord, request: Mapping[str, Any]) -> Any:
        return {"workflow_id": workflow.workflow_id}

    async def broken(self, workflow: WorkflowRecord, request: Mapping[str, Any]) -> Any:
        raise RuntimeError("a bug")

    async def reply(
        self, reply_to: str | None, correlation_id: str | None, doc: dict[str, Any], ct: str
    ) -> None:
        self.replies.append((reply_to, correlation_id, doc, ct))

    def rpc(self) -> Rpc:
        return Rpc(
            self.get_workflow,
            handlers={"ping": self.ping},
            about_workflow={"status": self.status, "broken": self.broken},
            reply=self.reply,
        )


@pytest.mark.parametrize(
    ("method", "request_", "answer"),
    [
        ("ping", {"x": 1}, {"ok": True, "data": {"pong": {"x": 1}}}),
        ("status", {"workflow_id": "wf-1"}, {"ok": True, "data": {"workflow_id": "wf-1"}}),
        ("status", {"workflow_id": "wf-nope"}, {"ok": True, "data": None}),
        (
            "status",
            {},
            {"ok": False, "error": {"type": "invalid", "message": "this request needs a workflow_id"}},
        ),
        ("nope", {}, {"ok": False, "error": {"type": "invalid", "message": "unknown query 'nope'"}}),
        (
            "broken",
            {"workflow_id": "wf-1"},
            {"ok": False, "error": {"type": "internal", "message": "RuntimeError: a bug"}},
        ),
    ],
)
async def test_the_table_answers_each_query(
    method: str, request_: dict[str, Any], answer: dict[str, Any]
) -> None:
    assert await Table().rpc().answer(method, codec.encode(request_), codec.MSGPACK) == answer


async def test_a_request_that_is_not_a_map_is_invalid_and_an_empty_body_is_an_empty_map() -> None:
    rpc = Table().rpc()
    answer = await rpc.answer("ping", codec.encode([1, 2]), codec.MSGPACK)
    assert answer == {"ok": False, "error": {"type": "invalid", "message": "request must be a map"}}
    assert (await rpc.answer("ping", b"\xc1", None))["error"]["type"] == "invalid"
    assert await rpc.answer("ping", b"", None) == {"ok": True, "data": {"pong": {}}}


async def test_a_bug_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="fabric.router"):
        await Table().rpc().answer("broken", codec.encode({"workflow_id": "wf-1"}), codec.MSGPACK)
    (record,) = [r for r in caplog.records if "broken query failed" in r.message]
    assert record.exc_info is not None


def test_the_table_lists_its_methods_and_a_method_lives_in_one_table() -> None:
    table = Table()
    assert table.rpc().methods == {"ping", "status", "broken"}
    with pytest.raises(ValueError, match="queries in both tables: ping"):
        Rpc(
            table.get_workflow,
            handlers={"ping": table.ping},
            about_workflow={"ping": table.status},
            reply=table.reply,
        )


@pytest.mark.parametrize(
    ("error", "raised", "not_found"),
    [
        ({"type": "not_found", "message": "no task 'x'"}, "not_found", True),
        ({"type": "KeyError", "message": "no task 'x'"}, "not_found", True),
        ({"type": "conflict", "message": "not escalated"}, "conflict", False),
        ({"type": "ValueError", "message": "not escalated"}, "conflict", False),
        ({"type": "invalid", "message": "bad"}, "invalid", False),
        ({"type": "ProtocolError", "message": "bad"}, "invalid", False),
        ({"type": "unavailable", "message": "store down"}, TransportError, None),
        ({"type": "StoreError", "message": "store down"}, TransportError, None),
        ({"type": "internal", "message": "RuntimeError: bug"}, TransportError, None),
        ({"type": "InternalError", "message": "RuntimeError: bug"}, TransportError, None),
        ({"type": "Gremlin", "message": "?"}, TransportError, None),
    ],
)
async def test_the_client_reads_answers_of_new_and_old_routers(
    monkeypatch: pytest.MonkeyPatch,
    error: dict[str, str],
    raised: object,
    not_found: bool | None,
) -> None:
    client = FabricClient(FabricSettings(namespace="unit"))

    async def answer(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"ok": False, "error": error}

    monkeypatch.setattr(client, "_request", answer)
    if raised is TransportError:
        with pytest.raises(TransportError, match=re.escape(error["message"])):
            await client.query("why", "wf-1")
        return
    with pytest.raises(RequestRefused, match=re.escape(error["message"])) as refused:
        await client.query("why", "wf-1")
    assert refused.value.error_type == raised
    assert refused.value.not_found is not_found
