"""Worker processes: graceful drain on SIGTERM, and a worker killed mid-task loses nothing."""

from __future__ import annotations

import signal

import pytest

from fabric import FabricClient
from fabric.settings import FabricSettings
from tests.conftest import eventually
from tests.e2e.conftest import Fleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


async def test_sigterm_drains_running_tasks(fleet: Fleet, settings: FabricSettings) -> None:
    await fleet.router()
    worker = await fleet.worker("w1", concurrency=2)
    async with FabricClient(settings) as client:
        accepted = await client.submit(
            {
                "tasks": [
                    {"id": f"s{i}", "capability": "demo.sleep", "input": {"seconds": 1.5}} for i in range(2)
                ]
            }
        )

        async def running() -> bool:
            status = await client.status(accepted.workflow_id)
            return status["counts"].get("running", 0) == 2

        await eventually(running, what="both tasks running")
        worker.kill(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log()
        done = await client.wait(accepted.workflow_id, timeout_s=30)
    assert done.status == "succeeded"
    assert all(t.agent == "w1" and t.attempts == 1 for t in done.tasks.values())
    assert "draining" in worker.log()


@pytest.mark.fault
async def test_worker_killed_mid_task_its_task_runs_elsewhere(fleet: Fleet, settings: FabricSettings) -> None:
    await fleet.router()
    doomed = await fleet.worker("doomed", concurrency=1)
    async with FabricClient(settings) as client:
        accepted = await client.submit(
            {"tasks": [{"id": "long", "capability": "demo.sleep", "input": {"seconds": 2}}]}
        )

        async def running_on_doomed() -> bool:
            task = (await client.status(accepted.workflow_id))["tasks"]["long"]
            return task["status"] == "running" and task["agent"] == "doomed"

        await eventually(running_on_doomed, what="the task running on the doomed worker")
        doomed.kill(signal.SIGKILL)
        doomed.wait(30)
        await fleet.worker("survivor", concurrency=1)
        done = await client.wait(accepted.workflow_id, timeout_s=60)

        async def registry() -> dict[str, str] | None:
            states = {a["agent_id"]: a["state"] for a in await client.query("agents")}
            return states if states.get("doomed") == "lost" and states.get("survivor") == "alive" else None

        # Heartbeats every 0.5 s here: three missed and the registry calls the agent lost.
        await eventually(registry, timeout=30, what="doomed marked lost, survivor alive")
    assert done.status == "succeeded"
    assert done.tasks["long"].agent == "survivor"
    assert done.tasks["long"].attempts == 2, "the lost attempt counts"
