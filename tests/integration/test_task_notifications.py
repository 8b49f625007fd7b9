"""Task notifications on ``{ns}.notify``: sent for the workflows that ask for them (or all, or none).

Each one is a message through the broker, so by default (``task_notifications: requested``) the router
sends them only for workflows submitted with the ``fabric-notify-tasks`` header, as
``FabricClient.submit(on_task=...)`` and ``POST /api/v1/workflows`` with ``Fabric-Notify-Tasks: true``
do; ``all`` sends them for every workflow, ``off`` for none.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fabric import FabricClient
from fabric.protocol import codec, headers
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


class Notes:
    """A queue bound to every notification of the namespace: task notes by workflow, completions."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[tuple[str, str]]] = {}
        self.completed: list[str] = []

    async def on_message(self, delivery: Delivery) -> None:
        await delivery.ack()
        note = codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
        if delivery.routing_key.startswith("workflow."):
            self.completed.append(note["workflow_id"])
        else:
            self.tasks.setdefault(note["workflow_id"], []).append((note["task_id"], note["status"]))


@pytest.fixture
async def notes(broker: AmqpConnection, settings: FabricSettings) -> Notes:
    seen = Notes()
    await broker.declare(spec.core(settings.namespace))
    queue = await broker.reply_queue(seen.on_message, prefetch=100)
    await queue.bind(names.notify_exchange(settings.namespace), "#")
    return seen


def two_tasks(workflow_id: str) -> dict[str, Any]:
    return {
        "workflow_id": workflow_id,
        "tasks": [
            {"id": "a", "capability": "demo.echo", "input": 1},
            {"id": "b", "capability": "demo.sum", "input": [1], "depends_on": ["a"]},
        ],
    }


def with_mode(settings: FabricSettings, mode: str) -> FabricSettings:
    return settings.model_copy(
        update={"router": settings.router.model_copy(update={"task_notifications": mode})}
    )


async def submit_raw(
    broker: AmqpConnection, settings: FabricSettings, workflow: dict[str, Any], **extra: Any
) -> None:
    """Submit as a client in another language would: the body, and the header when given."""
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode(workflow),
        content_type=codec.MSGPACK,
        message_id=workflow["workflow_id"],
        headers=extra or None,
    )


async def test_only_workflows_that_ask_get_task_notifications(
    settings: FabricSettings,
    router: Router,
    client: FabricClient,
    broker: AmqpConnection,
    start_worker: StartWorker,
    notes: Notes,
) -> None:
    await start_worker(demo, concurrency=4)
    await submit_raw(broker, settings, two_tasks("quiet"))
    await submit_raw(broker, settings, two_tasks("asked"), **{headers.NOTIFY_TASKS: True})
    followed: list[tuple[str, str]] = []
    listened = await client.run(
        two_tasks("listened"), on_task=lambda n: followed.append((n["task_id"], n["status"]))
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}") as http:
        response = await http.post(
            "/api/v1/workflows",
            json=two_tasks("over-http"),
            headers={"Fabric-Notify-Tasks": "true"},
        )
        assert response.status_code == 202, response.text

    everything = {"quiet", "asked", "listened", "over-http"}
    await eventually(lambda: set(notes.completed) >= everything, timeout=60, what="four completions")
    await eventually(
        lambda: all(("b", "succeeded") in notes.tasks.get(w, []) for w in everything - {"quiet"}),
        timeout=30,
        what="the last task notification of each workflow that asked",
    )
    assert listened.status == "succeeded"
    for workflow_id in everything - {"quiet"}:
        assert notes.tasks[workflow_id] == [
            ("a", "running"),
            ("a", "succeeded"),
            ("b", "queued"),
            ("b", "running"),
            ("b", "succeeded"),
        ], workflow_id
    assert ("b", "succeeded") in followed
    # The quiet workflow's completion came after its task changes were committed: had the router sent
    # task notifications for it, they would be here by now (one queue, in order from one channel).
    assert "quiet" not in notes.tasks


@pytest.mark.parametrize("mode", ["all", "off"])
async def test_task_notifications_setting(
    settings: FabricSettings,
    broker: AmqpConnection,
    start_worker: StartWorker,
    notes: Notes,
    mode: str,
) -> None:
    async with Router(with_mode(settings, mode)):
        await start_worker(demo, concurrency=4)
        await submit_raw(broker, settings, two_tasks("plain"))
        await submit_raw(broker, settings, two_tasks("asked"), **{headers.NOTIFY_TASKS: "true"})
        await eventually(lambda: len(notes.completed) == 2, timeout=60, what="two completions")
        if mode == "all":
            await eventually(
                lambda: all(("b", "succeeded") in notes.tasks.get(w, []) for w in ("plain", "asked")),
                timeout=30,
                what="task notifications of both workflows",
            )
        else:
            assert notes.tasks == {}


async def test_wait_on_task_reads_progress_of_a_workflow_submitted_without_notifications(
    settings: FabricSettings, router: Router, client: FabricClient, start_worker: StartWorker
) -> None:
    tasks = [{"id": f"s{i}", "capability": "demo.sleep", "input": {"seconds": 0.5}} for i in range(3)]
    accepted = await client.submit({"workflow_id": "elsewhere", "tasks": tasks})
    await start_worker(demo, concurrency=1)
    seen: list[tuple[str, str]] = []
    async with FabricClient(settings, reply_timeout_s=60) as other:
        done = await other.wait(
            accepted.workflow_id, timeout_s=60, on_task=lambda n: seen.append((n["task_id"], n["status"]))
        )
    assert done.status == "succeeded"
    # Polled once a second from the router's status: each task reported (a poll sees only the latest
    # state of each, so not every change).
    assert {task_id for task_id, _ in seen} == {"s0", "s1", "s2"}
