"""The point of the in-memory broker: a router, a worker and a client run a small DAG through
:class:`fabric.testing.MemoryBroker`, with no RabbitMQ, in about a second.

The router, the worker and the client build their own AMQP connections; the test gives them connections
to one MemoryBroker instead (the same Transport Protocol), and a memory store.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from fabric import Abort, Agent, FabricClient, Retry, Task, load_settings
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.testing import MemoryBroker
from fabric.topology import names
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


@pytest.fixture
def settings() -> FabricSettings:
    """A namespace of its own, a memory store, and a broker URL nothing answers at (nothing dials it)."""
    return load_settings(
        namespace=f"mem-{uuid.uuid4().hex[:8]}",
        amqp_url="amqp://nobody@memory.invalid:1/",
        store={"url": "memory://"},
        worker={"heartbeat_interval_s": 0.5, "drain_timeout_s": 5},
        http={"port": 0},
    )


async def test_a_router_and_a_worker_run_a_dag_over_the_memory_broker(
    broker: MemoryBroker, settings: FabricSettings
) -> None:
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


async def test_a_retry_goes_through_a_delay_queue_and_an_abort_parks_the_task(
    broker: MemoryBroker, settings: FabricSettings
) -> None:
    agent = Agent("memory-agent")
    calls: list[str] = []

    @agent.handler("mem.flaky")
    async def flaky(task: Task) -> Any:
        calls.append(task.task_id)
        if task.attempt == 1:
            # The worker sends it to the shortest delay tier: x-message-ttl, then dead-lettered back.
            raise Retry("not yet", delay_s=0.5)
        return "ok"

    @agent.handler("mem.doomed")
    async def doomed(task: Task) -> Any:
        raise Abort("cannot be done")

    graph = {
        "tasks": [
            {"id": "r", "capability": "mem.flaky"},
            {"id": "d", "capability": "mem.doomed"},
        ]
    }
    async with Router(settings), Worker(agent, settings), FabricClient(settings) as client:
        started = asyncio.get_running_loop().time()
        done = await client.run(graph, timeout_s=30)
        took = asyncio.get_running_loop().time() - started
    async with broker.connection(name="inspect") as transport:
        dead = await transport.queue_info(names.dead_queue(settings.namespace))
    assert done.status == "failed"
    retried = done.tasks["r"]
    assert (retried.status, retried.result, retried.attempts) == ("succeeded", "ok", 2)
    # Held back in the shortest tier's delay queue: the message expires after 80-100% of the tier
    # (the policy's jitter), then is dead-lettered back to its capability queue.
    assert took >= min(names.DELAY_TIERS_MS.values()) / 1000 * 0.75
    assert calls == ["r", "r"]
    assert done.tasks["d"].status == "dead"
    assert dead is not None
    assert dead.messages == 1


async def test_a_failure_cascades_through_a_chain_the_router_loads_step_by_step(
    broker: MemoryBroker, settings: FabricSettings
) -> None:
    """The router loads a failed task's direct dependents first; a cascade deeper than that makes the
    workflow core ask for every record (Incomplete), and the router decides again on all of them."""
    agent = Agent("memory-agent")

    @agent.handler("mem.step")
    async def step(task: Task) -> Any:
        if task.input == "fail":
            raise ValueError("no")
        return task.input

    graph = {
        "tasks": [
            {"id": "a", "capability": "mem.step", "input": "fail", "max_attempts": 1},
            {"id": "b", "capability": "mem.step", "depends_on": ["a"]},
            {"id": "c", "capability": "mem.step", "depends_on": ["b"]},
            {"id": "d", "capability": "mem.step", "depends_on": ["c"]},
            {"id": "e", "capability": "mem.step", "input": "ok"},
        ]
    }
    async with Router(settings), Worker(agent, settings), FabricClient(settings) as client:
        done = await client.run(graph, timeout_s=20)
    assert done.status == "failed"
    assert {tid: str(t.status) for tid, t in done.tasks.items()} == {
        "a": "dead",  # parked: out of attempts
        "b": "upstream_failed",
        "c": "upstream_failed",
        "d": "upstream_failed",
        "e": "succeeded",
    }
