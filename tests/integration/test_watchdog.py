"""The broker deletes a worker's queue while it consumes: the worker notices and consumes again."""

from __future__ import annotations

import asyncio

import pytest

from fabric import FabricClient
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_worker_resubscribes_after_its_queue_is_deleted(
    settings: FabricSettings, router: Router, client: FabricClient, broker: AmqpConnection
) -> None:
    watched = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"watchdog_interval_s": 0.3})}
    )
    queue = names.capability_queue(settings.namespace, "demo.echo")
    async with Worker(demo, watched) as worker:
        await broker.delete(
            spec.Topology(queues=(spec.QueueSpec(queue),))
        )  # as `rabbitmqctl delete_queue` would
        assert await broker.queue_info(queue) is None

        async def consumed_again() -> bool:
            info = await broker.queue_info(queue)
            return info is not None and info.consumers == 1

        await eventually(consumed_again, timeout=30, what="the queue declared and consumed again")
        assert await worker._check_consumers() is None
        done = await client.run(
            {"tasks": [{"id": "after", "capability": "demo.echo", "input": "back"}]}, timeout_s=30
        )
        assert done.tasks["after"].result == "back"
        assert not worker.failed_fatally


async def test_worker_that_cannot_consume_its_queue_again_stops_and_closes(
    settings: FabricSettings, router: Router, broker: AmqpConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue comes back declared otherwise (no priority): declaring it fails, and the worker stops
    of itself. The stop runs to its end: nothing cancels it half way, the connection is closed."""
    watched = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"watchdog_interval_s": 0.5})}
    )
    queue = names.capability_queue(settings.namespace, "demo.echo")
    worker = await Worker(demo, watched).__aenter__()
    try:
        await broker.delete(spec.Topology(queues=(spec.QueueSpec(queue),)))
        await broker.declare(spec.Topology(queues=(spec.QueueSpec(queue),)))
        await asyncio.wait_for(worker.wait_stopped(), timeout=30)
    finally:
        await broker.delete(spec.Topology(queues=(spec.QueueSpec(queue),)))
    assert worker.failed_fatally
    assert not worker._amqp.connected, "the stop closed the broker connection"
    assert "stopped after a fatal error" in caplog.text
