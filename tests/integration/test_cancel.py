"""Cancellation: queued tasks are skipped, running ones stopped, the workflow ends cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from fabric import Agent, FabricClient, Task
from fabric.router.service import Router
from fabric.settings import FabricSettings
from tests.conftest import cli, eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_cancel_a_running_workflow_of_twenty_sleepers(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    worker = await start_worker(demo, concurrency=10)
    tasks = [{"id": f"s{i}", "capability": "demo.sleep", "input": {"seconds": 60}} for i in range(20)]
    tasks.append({"id": "after", "capability": "demo.echo", "depends_on": ["s0"]})
    accepted = await client.submit({"workflow_id": "cancel-me", "tasks": tasks})
    await eventually(lambda: worker.in_flight == 10, what="ten tasks running")

    started = time.monotonic()
    outcome = await client.cancel(accepted.workflow_id)
    done = await client.wait(accepted.workflow_id, timeout_s=30)
    elapsed = time.monotonic() - started

    assert done.status == "cancelled"
    assert {o.status for o in done.tasks.values()} == {"cancelled"}
    assert len(outcome["cancelled"]) == 21
    assert elapsed < 5, f"cancelled in {elapsed:.1f}s"
    # The running handlers were stopped, and the queued ten were skipped, not run.
    await eventually(lambda: worker.in_flight == 0, timeout=15, what="the worker idle again")
    assert worker.processed == 0


async def test_cancel_one_task_and_what_depends_on_it(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    agent = Agent("cancel-one")
    extra_caps.append("t.wait")
    release = asyncio.Event()
    stopped: list[str] = []

    @agent.handler("t.wait")
    async def wait(task: Task) -> str:
        try:
            await release.wait()
        except asyncio.CancelledError:
            stopped.append(task.task_id)
            raise
        return task.task_id

    await start_worker(agent, concurrency=4)
    await start_worker(demo)
    accepted = await client.submit(
        {
            "tasks": [
                {"id": "keep", "capability": "t.wait"},
                {"id": "drop", "capability": "t.wait"},
                {"id": "drop-child", "capability": "demo.echo", "depends_on": ["drop"]},
            ]
        }
    )

    async def both_running() -> bool:
        counts = (await client.status(accepted.workflow_id))["counts"]
        return counts.get("running") == 2

    await eventually(both_running, what="both waiting tasks running")
    outcome = await client.cancel(accepted.workflow_id, "drop")
    assert sorted(outcome["cancelled"]) == ["drop", "drop-child"]
    await eventually(lambda: stopped == ["drop"], what="the running handler to be cancelled")
    release.set()
    done = await client.wait(accepted.workflow_id, timeout_s=30)
    assert done.tasks["keep"].status == "succeeded"
    assert (done.tasks["drop"].status, done.tasks["drop-child"].status) == ("cancelled", "cancelled")
    assert done.status == "cancelled"


async def test_cli_cancel(settings: FabricSettings, client: FabricClient, router: Router) -> None:
    accepted = await client.submit({"tasks": [{"id": "q", "capability": "demo.echo"}]})  # no worker: queued
    code, out, err = await cli(settings, "cancel", accepted.workflow_id)
    assert code == 0, err
    assert "cancelled 1 task(s)" in out
    assert "cancelled" in out.splitlines()[-1]
    code, _, err = await cli(settings, "cancel", "no-such-workflow")
    assert code == 5
    assert "no-such-workflow" in err
