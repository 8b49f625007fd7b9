"""A task that kills its worker every time is parked as worker_lost, never looped forever."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from fabric import FabricClient
from fabric.protocol import headers
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.e2e.conftest import Fleet, Proc

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.fault]

STEADY = textwrap.dedent(
    """
    from fabric import Agent, Task

    agent = Agent("steady")

    @agent.handler("demo.echo")
    async def echo(task: Task) -> object:
        return task.input
    """
)


async def test_crashing_task_is_parked_as_worker_lost_while_others_flow(
    fleet: Fleet, settings: FabricSettings, broker: AmqpConnection, tmp_path: Path
) -> None:
    (tmp_path / "steady_agent.py").write_text(STEADY)
    fleet.env["PYTHONPATH"] = str(tmp_path)
    await fleet.router()
    await fleet.worker("steady", "steady_agent:agent", queue="demo.echo")
    crashy: Proc = await fleet.worker("crashy-0", queue="demo.crash")
    restarts = 0

    async def supervise() -> None:
        """Restart the crashing worker whenever it dies, like a container orchestrator would."""
        nonlocal crashy, restarts
        while True:
            if not crashy.alive():
                restarts += 1
                crashy = fleet.spawn(
                    f"crashy-{restarts}",
                    "worker",
                    "workers.demo:agent",
                    FABRIC_WORKER__AGENT_ID=f"crashy-{restarts}",
                )
            await asyncio.sleep(0.2)

    supervisor = asyncio.create_task(supervise())
    try:
        async with FabricClient(settings, reply_timeout_s=60) as client:
            tasks = [{"id": "boom", "capability": "demo.crash", "max_attempts": 2}]
            tasks += [{"id": f"e{i}", "capability": "demo.echo", "input": i} for i in range(10)]
            done = await client.run({"tasks": tasks}, timeout_s=120)
    finally:
        supervisor.cancel()
    assert done.status == "failed"
    boom = done.tasks["boom"]
    assert boom.status == "dead"
    assert boom.error is not None
    assert boom.error.type == "WorkerLost"
    assert boom.attempts == 2
    assert all(done.tasks[f"e{i}"].result == i for i in range(10)), "other tasks keep flowing"
    assert restarts == 2, "two attempts, two crashed workers, then parked"

    found: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        found.append(delivery)
        await delivery.ack()

    await broker.consume(names.dead_queue(settings.namespace), collect, prefetch=10)
    await eventually(lambda: found, what="the parked task")
    assert headers.get_str(found[0].headers, headers.DEAD_REASON) == "worker_lost"
