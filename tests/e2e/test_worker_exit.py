"""A worker process whose sync handler never returns still exits after SIGTERM, and its task survives."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from fabric import FabricClient
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.e2e.conftest import Fleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]

STUCK_AGENT = """
import time

from fabric import Agent, Task

agent = Agent("stuck")


@agent.handler("e2e.stuck")
def stuck(task: Task) -> None:
    while True:  # never looks at task.cancelled
        time.sleep(0.05)
"""

DRAIN_TIMEOUT_S = 2


async def test_worker_stuck_in_a_sync_handler_exits_after_sigterm(
    fleet: Fleet,
    settings: FabricSettings,
    broker: AmqpConnection,
    tmp_path: Path,
    extra_caps: list[str],
) -> None:
    extra_caps.append("e2e.stuck")
    modules = tmp_path / "agents"
    modules.mkdir()
    (modules / "stuck_agent.py").write_text(STUCK_AGENT)
    python_path = os.pathsep.join(p for p in (str(modules), os.environ.get("PYTHONPATH", "")) if p)
    queue = names.capability_queue(settings.namespace, "e2e.stuck")

    await fleet.router()
    worker = fleet.spawn(
        "stuck",
        "worker",
        "stuck_agent:agent",
        "--concurrency",
        "1",
        FABRIC_WORKER__AGENT_ID="stuck",
        FABRIC_WORKER__DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        PYTHONPATH=python_path,
    )

    async def consuming() -> bool:
        if not worker.alive():
            raise AssertionError(f"the worker exited early:\n{worker.log()}")
        info = await broker.queue_info(queue)
        return info is not None and info.consumers > 0

    await eventually(consuming, what="the stuck worker consuming")
    async with FabricClient(settings) as client:
        accepted = await client.submit({"tasks": [{"id": "s", "capability": "e2e.stuck"}]})

        async def running() -> bool:
            task = (await client.status(accepted.workflow_id))["tasks"]["s"]
            return bool(task["status"] == "running" and task["agent"] == "stuck")

        await eventually(running, what="the task running on the stuck worker")
    began = time.monotonic()
    worker.kill(signal.SIGTERM)
    # The handler's thread never returns; the process must not wait for it (a daemon thread).
    code = await asyncio.to_thread(worker.wait, DRAIN_TIMEOUT_S + 10)
    elapsed = time.monotonic() - began
    assert code == 0, worker.log()
    assert elapsed < DRAIN_TIMEOUT_S + 10
    assert "drain deadline passed" in worker.log()

    # The task was never acked: it is back in its queue for another worker.
    async def requeued() -> bool:
        info = await broker.queue_info(queue)
        return info is not None and info.messages == 1

    await eventually(requeued, timeout=10, what="the task back in its queue")
