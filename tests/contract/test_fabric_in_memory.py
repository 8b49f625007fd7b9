"""The point of the in-memory broker: a router, a worker and a client run a small DAG through
:class:`fabric.testing.MemoryBroker`, with no RabbitMQ, in about a second.

The router, the worker and the client build their own AMQP connections; the test gives them connections
to one MemoryBroker instead (the same Transport Protocol), and a memory store.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from fabric import Agent, FabricClient, Task, load_settings
from fabric.router.service import Router
from fabric.testing import MemoryBroker
from fabric.worker.runtime import Worker


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> MemoryBroker:
    """One in-memory broker that every AmqpConnection built during the test connects to."""
    memory = MemoryBroker()

    def connect(url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> Any:
        return memory.connection(name=name)

    for module in ("fabric.router.service", "fabric.worker.runtime", "fabric.client.client"):
        monkeypatch.setattr(f"{module}.AmqpConnection", connect)
    return memory


async def test_a_router_and_a_worker_run_a_dag_over_the_memory_broker(broker: MemoryBroker) -> None:
    settings = load_settings(
        namespace=f"mem-{uuid.uuid4().hex[:8]}",
        amqp_url="amqp://nobody@memory.invalid:1/",
        store={"url": "memory://"},
        worker={"heartbeat_interval_s": 0.5, "drain_timeout_s": 5},
        http={"port": 0},
    )
    agent = Agent("memory-agent")

    @agent.handler("mem.double")
    async def double(task: Task) -> Any:
        return 2 * (task.input or 1) + sum(task.upstream.values())

    graph = {
        "tasks": [
            {"id": "a", "capability": "mem.double", "input": 1},
            {"id": "b", "capability": "mem.double", "input": 10},
            {"id": "c", "capability": "mem.double", "input": 100, "depends_on": ["a", "b"]},
        ]
    }
    async with Router(settings), Worker(agent, settings), FabricClient(settings) as client:
        done = await client.run(graph, timeout_s=20)
    assert done.status == "succeeded"
    assert {tid: t.result for tid, t in done.tasks.items()} == {"a": 2, "b": 20, "c": 222}
    assert broker.published > 0
