"""`why` gives each unfinished task its reason, each situation set up for real."""

from __future__ import annotations

import asyncio
import time

import pytest

from fabric import Agent, FabricClient, Retry, Task
from fabric.router.service import Router
from tests.conftest import eventually
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq


async def test_why_names_the_reason_of_every_unfinished_task(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    agent = Agent("why")
    busy_agent = Agent("why-busy")
    extra_caps.extend(["t.slow", "t.busy", "t.later", "t.nobody"])
    release = asyncio.Event()

    @agent.handler("t.slow")
    async def slow(task: Task) -> str:
        await release.wait()
        return "done"

    @busy_agent.handler("t.busy")
    async def busy(task: Task) -> str:
        await release.wait()
        return "done"

    @agent.handler("t.later")
    async def later(task: Task) -> str:
        if task.attempt == 1:
            raise Retry("rate limited", delay_s=20)
        return "done"

    await start_worker(agent, concurrency=3)
    # Two slots for three t.busy tasks: one stays queued in the broker (the prefetch is the concurrency).
    await start_worker(busy_agent, concurrency=2)
    accepted = await client.submit(
        {
            "workflow_id": "why-1",
            "tasks": [
                {"id": "running", "capability": "t.slow"},
                {"id": "next", "capability": "t.slow", "depends_on": ["running"]},
                {"id": "busy1", "capability": "t.busy"},
                {"id": "busy2", "capability": "t.busy"},
                {"id": "busy3", "capability": "t.busy", "priority": 1},
                {"id": "retry", "capability": "t.later"},
                {"id": "orphan", "capability": "t.nobody"},
            ],
        }
    )

    async def settled() -> dict[str, dict[str, object]] | None:
        answers = {a["task_id"]: a for a in await client.why(accepted.workflow_id)}
        wanted = {"running": "running_on", "retry": "backoff_until", "busy3": "queued"}
        return answers if all(answers[t]["reason"] == r for t, r in wanted.items()) else None

    answers = await eventually(settled, what="every task in its situation")
    assert answers["busy1"]["reason"] == "running_on"
    assert answers["running"]["agent"] != answers["busy1"]["agent"]
    assert answers["next"]["reason"] == "waiting_on"
    assert answers["next"]["waiting_on"] == ["running"]
    assert answers["orphan"]["reason"] == "no_agent"
    assert "t.nobody" in str(answers["orphan"]["detail"])
    assert answers["busy3"]["queue_depth"] == 1
    until = answers["retry"]["until"]
    assert isinstance(until, float)
    assert time.time() + 10 < until <= time.time() + 31, "Retry(delay_s=20) waits in the 30s tier"
    assert "rate limited" in str(answers["retry"]["detail"])
    (one,) = await client.why(accepted.workflow_id, "orphan")
    assert one["reason"] == "no_agent"
    release.set()
