"""kill -9 of the router in the middle of a 200-task workflow: nothing lost, nothing completed twice."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from fabric import FabricClient
from fabric.protocol import codec
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.e2e.conftest import Fleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.fault]

LAYERS, WIDTH = 10, 20


def layered_workflow(workflow_id: str) -> dict[str, object]:
    """10 layers of 20 tasks; each task depends on its column's task in the layer above."""
    tasks = []
    for layer in range(LAYERS):
        for col in range(WIDTH):
            task: dict[str, object] = {"id": f"L{layer}-{col}", "capability": "demo.sum", "input": 1}
            if layer:
                task["depends_on"] = [f"L{layer - 1}-{col}"]
            tasks.append(task)
    return {"workflow_id": workflow_id, "tasks": tasks}


async def test_router_killed_mid_workflow_restarts_without_loss(
    fleet: Fleet, settings: FabricSettings, broker: AmqpConnection
) -> None:
    workflow_id = "restart-200"
    # Follow every task notification, to count terminal states per task across the crash.
    succeeded: Counter[str] = Counter()
    router = await fleet.router("router-1")
    announced: list[str] = []

    async def on_note(delivery: Delivery) -> None:
        note = codec.decode(delivery.body)
        if delivery.routing_key.startswith("workflow."):
            announced.append(note["status"])
        elif note["status"] == "succeeded":
            succeeded[note["task_id"]] += 1
        await delivery.ack()

    notes = await broker.reply_queue(on_note, prefetch=500)
    await notes.bind(names.notify_exchange(settings.namespace), f"task.{workflow_id}.#")
    await notes.bind(names.notify_exchange(settings.namespace), f"workflow.{workflow_id}.*")
    await fleet.worker("w1", concurrency=4, queue="demo.sum")
    await fleet.worker("w2", concurrency=4, queue="demo.sum")
    async with FabricClient(settings, reply_timeout_s=120) as client:
        # Asking for task notifications (on_task): the router sends them only for workflows that ask,
        # and router-2 must go on sending them after the crash (the request is stored).
        await client.submit(layered_workflow(workflow_id), on_task=lambda note: None)
        await eventually(lambda: sum(succeeded.values()) >= 40, timeout=120, what="40 tasks done")
        router.kill(signal.SIGKILL)
        assert router.wait(30) == -signal.SIGKILL
        done_at_kill = sum(succeeded.values())
        assert done_at_kill < LAYERS * WIDTH, "the workflow must still be in flight when the router dies"

        await fleet.router("router-2")
        done = await client.wait(workflow_id, timeout_s=300)

    assert done.status == "succeeded", {t: o.status for t, o in done.tasks.items() if o.status != "succeeded"}
    assert len(done.tasks) == LAYERS * WIDTH
    assert all(o.result == layer + 1 for t, o in done.tasks.items() for layer in [int(t[1 : t.index("-")])])
    await eventually(lambda: announced, timeout=60, what="the workflow's completion notification")
    assert announced == ["succeeded"], "the workflow completes exactly once"
    # Task notifications are sent after the state is committed: one lost in the instant of the crash is
    # possible (the store and the completed document hold the truth), a second completion is not.
    twice = {task: n for task, n in succeeded.items() if n > 1}
    assert not twice, f"tasks recorded as succeeded more than once: {twice}"
    assert len(succeeded) > done_at_kill
