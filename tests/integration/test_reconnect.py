"""Cut every broker connection under a running fabric: router, worker and client reconnect and carry on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import pytest

from fabric import FabricClient
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.integration.test_health import http_get
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


async def test_readyz_is_unready_while_the_broker_is_cut_off_and_ready_when_it_returns(
    settings: FabricSettings, proxy: TcpProxy
) -> None:
    cut_settings = through(settings, proxy)
    async with Router(cut_settings) as router, Worker(demo, cut_settings) as worker:
        ports = {"router": router.http_port, "worker": worker.http_port}
        for name, port in ports.items():
            assert port, name
            status, body = await http_get(port, "/readyz")
            assert status == 200, f"{name}: {body}"

        proxy.refusing = True  # the broker stays unreachable until the test lets it back
        try:
            await proxy.cut()
            for name, port in ports.items():
                assert port

                async def unready(port: int = port) -> dict[str, Any] | None:
                    status, body = await http_get(port, "/readyz")
                    doc: dict[str, Any] = json.loads(body)
                    return doc if status == 503 and doc["checks"]["broker"] != "ok" else None

                doc = await eventually(unready, timeout=30, what=f"{name} /readyz to say unready")
                assert doc["status"] == "unready"
                assert doc["checks"]["broker"] == "broker connection is down"
                assert doc["checks"]["consumers"].startswith("not consuming")
                # Alive all the same: liveness must not make an orchestrator restart a reconnecting process.
                assert (await http_get(port, "/healthz"))[0] == 200
        finally:
            proxy.refusing = False

        for name, port in ports.items():
            assert port

            async def ready(port: int = port) -> bool:
                return (await http_get(port, "/readyz"))[0] == 200

            await eventually(ready, timeout=60, what=f"{name} /readyz to say ready again")


async def test_router_and_worker_stop_promptly_while_the_broker_is_unreachable(
    settings: FabricSettings, proxy: TcpProxy
) -> None:
    """SIGTERM during a broker outage: closing must not wait for a connection that is not coming back."""
    cut_settings = through(settings, proxy)
    router = await Router(cut_settings).__aenter__()
    worker = await Worker(demo, cut_settings).__aenter__()
    proxy.refusing = True
    try:
        await proxy.cut()
        await eventually(
            lambda: not router._amqp.connected and not worker._amqp.connected, what="both to notice the cut"
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(worker.drain(timeout_s=1), 20)
        await asyncio.wait_for(router.__aexit__(None, None, None), 20)
        assert loop.time() - started < 20
    finally:
        proxy.refusing = False
