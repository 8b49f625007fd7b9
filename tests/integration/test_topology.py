"""Topology drift is reported clearly; a capability queue deleted under the router is declared again."""

from __future__ import annotations

import pytest

from fabric import FabricClient, TopologyMismatch
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker.runtime import Worker
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_drifted_queue_is_reported_not_crashed_on(
    settings: FabricSettings, broker: AmqpConnection
) -> None:
    queue = names.capability_queue(settings.namespace, "demo.echo")
    # Someone declared the capability queue without priorities.
    await broker.declare(spec.Topology(queues=(spec.QueueSpec(queue),)))
    problems = await broker.check(spec.build(settings.namespace, ["demo.echo"]))
    drift = [p for p in problems if p.startswith(queue)]
    assert len(drift) == 1
    assert "x-max-priority" in drift[0]
    assert any("missing" in p for p in problems), "the rest of the topology does not exist yet"
    with pytest.raises(TopologyMismatch) as info:
        async with Worker(demo, settings):
            pass
    assert info.value.name == queue
    assert "x-max-priority" in info.value.detail


async def test_deleted_capability_queue_is_declared_again(
    settings: FabricSettings,
    router: Router,
    client: FabricClient,
    start_worker: StartWorker,
    broker: AmqpConnection,
) -> None:
    first = await client.submit({"tasks": [{"id": "a", "capability": "demo.echo", "input": 1}]})
    queue = names.capability_queue(settings.namespace, "demo.echo")
    assert await broker.queue_info(queue) is not None
    # An operator deletes the queue (and the task in it): the router's next publish is unroutable.
    await broker.delete(spec.Topology(queues=(spec.QueueSpec(queue),)))
    assert await broker.queue_info(queue) is None
    second = await client.submit({"tasks": [{"id": "b", "capability": "demo.echo", "input": 2}]})
    info = await broker.queue_info(queue)
    assert info is not None
    assert info.messages == 1
    await start_worker(demo)
    done = await client.wait(second.workflow_id, timeout_s=60)
    assert done.tasks["b"].result == 2
    status = await client.status(first.workflow_id)
    assert status["tasks"]["a"]["status"] == "queued", "the deleted task is still known as queued"
