"""Cut every broker connection under a running fabric: router, worker and client reconnect and carry on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest

from fabric import FabricClient
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.proxy import TcpProxy
from workers.demo import agent as demo

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault]


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    parsed = urlparse(amqp_url)
    async with TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672) as p:
        yield p


def through(settings: FabricSettings, proxy: TcpProxy) -> FabricSettings:
    parsed = urlparse(settings.amqp_url.get_secret_value())
    url = parsed._replace(netloc=f"{parsed.username}:{parsed.password}@127.0.0.1:{proxy.port}").geturl()
    return settings.model_copy(update={"amqp_url": type(settings.amqp_url)(url)})


async def test_everything_reconnects_after_the_network_drops(
    settings: FabricSettings, proxy: TcpProxy
) -> None:
    cut_settings = through(settings, proxy)
    async with (
        Router(cut_settings) as router,
        Worker(demo, cut_settings) as worker,
        FabricClient(cut_settings, reply_timeout_s=60) as client,
    ):
        first = await client.run(
            {"tasks": [{"id": "a", "capability": "demo.echo", "input": 1}]}, timeout_s=60
        )
        assert first.status == "succeeded"
        before = proxy.accepted

        await proxy.cut()

        # Every process notices, reconnects, and consumes again (readiness tells the truth meanwhile).
        await eventually(lambda: proxy.accepted >= before + 3, timeout=60, what="three reconnections")

        async def all_consuming() -> bool:
            return await router._check_consumers() is None and await worker._check_consumers() is None

        await eventually(all_consuming, timeout=60, what="router and worker consuming again")
        second = await client.run(
            {
                "tasks": [
                    {"id": "b", "capability": "demo.echo", "input": 2},
                    {"id": "c", "capability": "demo.sum", "input": 3, "depends_on": ["b"]},
                ]
            },
            timeout_s=60,
        )
        assert second.status == "succeeded"
        assert second.tasks["c"].result == 5  # its input 3 plus b's result 2


async def test_a_publish_during_a_reconnect_waits_for_it(
    settings: FabricSettings, proxy: TcpProxy, broker: AmqpConnection
) -> None:
    ns = settings.namespace
    cut_url = through(settings, proxy).amqp_url.get_secret_value()
    async with AmqpConnection(cut_url, name="reconnecting publisher") as amqp:
        await amqp.declare(spec.core(ns))
        await proxy.cut()
        await eventually(lambda: not amqp.connected, what="the publisher to notice the cut")
        # Not an error: the publish waits for the robust connection to come back, then goes out.
        await amqp.publish(
            names.submit_exchange(ns), names.SUBMIT_ROUTING_KEY, b"{}", content_type="application/json"
        )
    info = await broker.queue_info(names.submit_queue(ns))
    assert info is not None
    assert info.messages == 1
