"""Parked tasks: `fabric dead list|show|replay|purge` against an in-process router on the real broker."""

from __future__ import annotations

import json

import pytest

from fabric import Agent, FabricClient, Task
from fabric.protocol import headers
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import cli, eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_list_show_replay_and_purge(
    settings: FabricSettings,
    router: Router,
    client: FabricClient,
    start_worker: StartWorker,
    extra_caps: list[str],
) -> None:
    agent = Agent("repairable")
    extra_caps.append("t.fix")
    repaired = False

    @agent.handler("t.fix")
    async def fix(task: Task) -> str:
        if not repaired:
            raise RuntimeError("the API key is wrong")
        return "fixed"

    await start_worker(agent)
    await start_worker(demo)
    first = await client.run(
        {
            "workflow_id": "needs-repair",
            "tasks": [
                {"id": "a", "capability": "t.fix", "max_attempts": 1},
                {"id": "b", "capability": "demo.echo", "input": "after", "depends_on": ["a"]},
            ],
        },
        timeout_s=60,
    )
    assert (first.status, first.tasks["a"].status, first.tasks["b"].status) == (
        "failed",
        "dead",
        "upstream_failed",
    )

    code, out, err = await cli(settings, "dead", "list", "--json")
    assert code == 0, err
    (parked,) = json.loads(out)
    assert (parked["reason"], parked["workflow_id"], parked["task_id"], parked["attempt"]) == (
        "exhausted",
        "needs-repair",
        "a",
        1,
    )
    assert "the API key is wrong" in parked["last_error"]

    code, out, err = await cli(settings, "dead", "show", parked["id"])
    assert code == 0, err
    shown = json.loads(out)
    assert shown["body"]["input"] is None
    assert shown["headers"]["fabric-dead-reason"] == "exhausted"

    repaired = True
    code, out, err = await cli(settings, "dead", "replay", parked["id"])
    assert code == 0, err + out
    assert "replayed 1" in out

    async def succeeded() -> bool:
        return (await client.status("needs-repair"))["status"] == "succeeded"

    await eventually(succeeded, what="the replayed workflow to succeed")
    status = await client.status("needs-repair")
    assert status["tasks"]["a"]["attempts"] == 1
    assert [h["error"]["type"] for h in status["tasks"]["a"]["history"]] == ["RuntimeError", "Replayed"]
    assert status["tasks"]["b"]["status"] == "succeeded"
    code, out, _ = await cli(settings, "dead", "list", "--json")
    assert json.loads(out) == [], "a replayed task leaves the dead queue"


async def test_purge_needs_yes_and_removes_old_messages(
    settings: FabricSettings, router: Router, client: FabricClient, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    await client.run({"tasks": [{"id": "x", "capability": "demo.fail", "max_attempts": 1}]}, timeout_s=60)
    code, _, err = await cli(settings, "dead", "purge", "--older-than", "0")
    assert code == 2
    assert "--yes" in err
    code, out, err = await cli(settings, "dead", "purge", "--older-than", "0", "--yes")
    assert code == 0, err
    assert "purged 1" in out
    code, out, _ = await cli(settings, "dead", "list", "--json")
    assert json.loads(out) == []


async def test_replaying_a_task_that_is_not_dead_is_refused(
    settings: FabricSettings, router: Router, client: FabricClient, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    done = await client.run(
        {"workflow_id": "fine", "tasks": [{"id": "ok", "capability": "demo.echo"}]}, timeout_s=60
    )
    assert done.status == "succeeded"
    with pytest.raises(Exception, match="only dead or failed tasks"):
        await client.replay("fine", "ok")


async def test_unreadable_messages_are_parked_as_they_came(
    router: Router, start_worker: StartWorker, broker: AmqpConnection, settings: FabricSettings
) -> None:
    # The router (an event it cannot read) and a worker (a task message it cannot read) park the message
    # unchanged under its own route, with why; neither process stops.
    await start_worker(demo)
    ns = settings.namespace
    garbage = b"\xc1 not msgpack"
    await broker.publish(names.tasks_exchange(ns), "demo.echo", garbage, message_id="junk-task")
    await broker.publish(
        names.events_exchange(ns), names.event_routing_key("succeeded"), garbage, message_id="junk-event"
    )
    found: dict[str | None, Delivery] = {}

    async def collect(delivery: Delivery) -> None:
        found[delivery.message_id] = delivery
        await delivery.ack()

    consumer = await broker.consume(names.dead_queue(ns), collect, prefetch=10)
    try:
        await eventually(lambda: len(found) >= 2, what="both unreadable messages parked")
    finally:
        await consumer.cancel()
    task, event = found["junk-task"], found["junk-event"]
    assert (task.body, event.body) == (garbage, garbage)
    assert headers.get_str(task.headers, headers.DEAD_REASON) == "malformed_task"
    assert headers.get_str(event.headers, headers.DEAD_REASON) == "malformed_event"
    assert headers.get_str(task.headers, headers.ORIGINAL_ROUTING_KEY) == "demo.echo"
    assert headers.get_str(event.headers, headers.ORIGINAL_ROUTING_KEY) == names.event_routing_key(
        "succeeded"
    )
    assert headers.get_str(task.headers, headers.LAST_ERROR)
    assert headers.get_str(event.headers, headers.LAST_ERROR)
    assert router.active
