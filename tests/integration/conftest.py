"""In-process router and workers on the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fabric import Agent
from fabric.policy import FailurePolicy
from fabric.protocol.messages import Alert, AlertStatus
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from fabric.worker.runtime import Worker

pytestmark = pytest.mark.rabbitmq

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def router(settings: FabricSettings) -> AsyncIterator[Router]:
    async with Router(settings) as r:
        yield r


@pytest.fixture
async def start_worker(settings: FabricSettings) -> AsyncIterator[StartWorker]:
    """Start in-process workers; every one still running is drained at teardown."""
    started: list[Worker] = []

    async def start(
        agent: Agent,
        *,
        concurrency: int | None = None,
        agent_id: str | None = None,
        policy: FailurePolicy | None = None,
    ) -> Worker:
        worker_settings = settings
        if agent_id:
            worker_settings = settings.model_copy(
                update={"worker": settings.worker.model_copy(update={"agent_id": agent_id})}
            )
        worker = Worker(agent, worker_settings, concurrency=concurrency, policy=policy)
        await worker.__aenter__()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.drain(timeout_s=5)


class AlertQueue:
    """A test queue bound to ``{ns}.alerts`` with ``alert.#``: every alert published, in order."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, Alert]] = []

    async def on_message(self, delivery: Delivery) -> None:
        await delivery.ack()
        assert delivery.content_type == "application/json"
        self.alerts.append((delivery.routing_key, Alert.model_validate_json(delivery.body)))

    def of(self, key: str, status: AlertStatus = AlertStatus.FIRING) -> list[tuple[str, Alert]]:
        return [(rk, a) for rk, a in self.alerts if a.key == key and a.status is status]


@pytest.fixture
async def alert_queue(broker: AmqpConnection, settings: FabricSettings) -> AlertQueue:
    queue = AlertQueue()
    consumer = await broker.reply_queue(queue.on_message, prefetch=100)
    await consumer.bind(names.alerts_exchange(settings.namespace), "alert.#")
    return queue
