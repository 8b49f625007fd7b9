"""The router's query answers on the wire: an error's ``type`` is a stable name (``not_found``,
``invalid``, ``conflict`` …, docs/protocol.md §7), never a Python class name; the client reads it."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import FabricClient, RequestRefused
from fabric.protocol import codec
from fabric.router.service import Router
from fabric.topology import names

pytestmark = pytest.mark.rabbitmq

WORKFLOW = {"workflow_id": "rpc-1", "tasks": [{"id": "a", "capability": "t.rpc.nobody"}]}


async def ask(client: FabricClient, method: str, request: dict[str, Any]) -> dict[str, Any]:
    """The router's raw answer to one query."""
    return await client._request(
        names.rpc_exchange(client.ns), method, codec.encode(request), codec.MSGPACK, None
    )


@pytest.mark.parametrize(
    ("method", "request_", "error_type", "message"),
    [
        (
            "why",
            {"workflow_id": "rpc-1", "task_id": "nope"},
            "not_found",
            "workflow rpc-1 has no task 'nope'",
        ),
        (
            "replay",
            {"workflow_id": "rpc-1", "task_id": "a"},
            "conflict",
            "only dead or failed tasks can be replayed",
        ),
        (
            "abort",
            {"workflow_id": "rpc-1", "task_id": "a", "reason": 5},
            "invalid",
            "reason must be a string",
        ),
        ("resume", {"workflow_id": "rpc-1"}, "invalid", "this request needs a task_id"),
        ("status", {}, "invalid", "this request needs a workflow_id"),
        ("cancelled", {"cursor": 7}, "invalid", "cursor must be a string"),
    ],
)
async def test_an_error_answer_names_a_stable_type(
    client: FabricClient,
    router: Router,
    extra_caps: list[str],
    method: str,
    request_: dict[str, Any],
    error_type: str,
    message: str,
) -> None:
    extra_caps.append("t.rpc.nobody")
    await client.submit(WORKFLOW)
    answer = await ask(client, method, request_)
    assert answer["ok"] is False
    assert set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == error_type
    assert message in answer["error"]["message"]


async def test_the_client_raises_refusals_with_the_stable_type(
    client: FabricClient, router: Router, extra_caps: list[str]
) -> None:
    extra_caps.append("t.rpc.nobody")
    await client.submit(WORKFLOW)
    with pytest.raises(RequestRefused, match="no task 'nope'") as missing:
        await client.why("rpc-1", "nope")
    assert (missing.value.error_type, missing.value.not_found) == ("not_found", True)
    with pytest.raises(RequestRefused) as refused:
        await client.replay("rpc-1", "a")
    assert (refused.value.error_type, refused.value.not_found) == ("conflict", False)
    # A good query still answers ok, and an unknown workflow is data null, not an error.
    assert (await ask(client, "status", {"workflow_id": "rpc-nope"})) == {"ok": True, "data": None}


async def test_the_router_answers_every_bound_query(router: Router) -> None:
    assert router.rpc.methods == set(names.RPC_METHODS)
