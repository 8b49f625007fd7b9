"""``FABRIC_WORKER__STARTED_AFTER_S``: the ``started`` event only for tasks still running after it.

A task that ends sooner sends its outcome alone, carrying when it began; the router records it started
(counter, ``started_at``) all the same. A longer task announces itself once the delay has passed, and
its outcome follows the confirmed ``started`` event in order.
"""

from __future__ import annotations

from typing import Any

import pytest

from fabric import FabricClient
from fabric.errors import ConfigError
from fabric.protocol import codec
from fabric.router.service import Router
from fabric.settings import FabricSettings, load_settings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Delivery
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_only_tasks_running_past_the_delay_announce_their_start(
    settings: FabricSettings, broker: AmqpConnection, client: FabricClient
) -> None:
    events: list[dict[str, Any]] = []

    async def on_event(delivery: Delivery) -> None:
        await delivery.ack()
        events.append(codec.decode(delivery.body, delivery.content_type or codec.MSGPACK))

    await broker.declare(spec.core(settings.namespace))
    tap = await broker.reply_queue(on_event, prefetch=100)
    await tap.bind(names.events_exchange(settings.namespace), "task.#")
    delayed = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"started_after_s": 0.5})}
    )
    async with Router(settings) as router:
        worker = Worker(demo, delayed, concurrency=4)
        await worker.__aenter__()
        try:
            done = await client.run(
                {
                    "workflow_id": "mixed",
                    "tasks": [
                        {"id": "quick", "capability": "demo.echo", "input": 1},
                        {"id": "slow", "capability": "demo.sleep", "input": {"seconds": 1.5}},
                    ],
                },
                timeout_s=60,
            )
        finally:
            await worker.drain(timeout_s=5)
        assert done.status == "succeeded"
        await eventually(lambda: len(events) == 3, timeout=30, what="three events")
        by_task = {t: [e for e in events if e["task_id"] == t] for t in ("quick", "slow")}
        quick, slow = by_task["quick"], by_task["slow"]

        assert [e["status"] for e in quick] == ["succeeded"], "ended before the delay: no started event"
        assert quick[0]["started_at"] <= quick[0]["at"]
        assert [e["status"] for e in slow] == ["started", "succeeded"], "announced after the delay, in order"
        assert "started_at" not in slow[1], "its start was announced: the outcome does not repeat it"
        assert slow[0]["at"] < slow[1]["at"]

        stored = await router.store.get_tasks("mixed")
        assert stored["quick"].started_at == quick[0]["started_at"]
        assert stored["quick"].attempts == 1
        assert stored["slow"].started_at == slow[0]["at"]
        assert router.metrics.totals["tasks_started"] == 2, "both counted as started, once each"


def test_started_after_must_stay_below_the_lease() -> None:
    with pytest.raises(ConfigError, match="started_after_s"):
        load_settings(worker={"started_after_s": 1200, "lease_after_s": 600})
    assert load_settings(worker={"started_after_s": 0.5}).worker.started_after_s == 0.5
