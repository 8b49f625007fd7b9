"""A circuit breaker per agent per capability: a failing agent stops taking the work, probes, recovers."""

from __future__ import annotations

import pytest

from fabric import Agent, FabricClient, Task
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq


async def test_failing_agent_stops_taking_work_probes_once_and_recovers(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
) -> None:
    extra_caps.append("t.llm")
    broken = True
    runs: dict[str, list[str]] = {"sick": [], "healthy": []}

    def make(name: str) -> Agent:
        agent = Agent(name)

        @agent.handler("t.llm")
        async def call(task: Task) -> str:
            runs[name].append(task.task_id)
            if name == "sick" and broken:
                raise ConnectionError("model endpoint unreachable")
            return name

        return agent

    breaker_settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"breaker_failures": 3, "breaker_cooldown_s": 4.0})
        }
    )
    async with Worker(make("sick"), breaker_settings, concurrency=1) as sick:
        # Alone, the sick agent fails three tasks in a row: its breaker opens and it stops consuming.
        first = await client.submit(
            {"tasks": [{"id": f"p{i}", "capability": "t.llm", "max_attempts": 1} for i in range(3)]}
        )
        await client.wait(first.workflow_id, timeout_s=60)
        assert runs["sick"] == ["p0", "p1", "p2"]
        assert sick._breakers["t.llm"].state == "open"
        assert await sick._check_consumers() is None, "an open breaker is not a readiness failure"

        # While it is the only agent and its breaker is open, `why` says so.
        waiting = await client.submit({"tasks": [{"id": "q", "capability": "t.llm"}]})

        async def circuit_open() -> bool:
            (answer,) = await client.why(waiting.workflow_id)
            return answer["reason"] == "circuit_open"

        await eventually(circuit_open, what="why to report the open breaker (heartbeats carry it)")

        # While it is open, a healthy agent takes all the work.
        healthy = await start_worker(make("healthy"), concurrency=4)
        work = await client.run(
            {"tasks": [{"id": f"w{i}", "capability": "t.llm"} for i in range(10)]}, timeout_s=60
        )
        assert all(t.result == "healthy" for t in work.tasks.values())
        assert runs["sick"] == ["p0", "p1", "p2"], "nothing went to the open breaker"

        # The healthy agent leaves. After the cool-down exactly one probe task reaches the sick agent;
        # it fails, and the breaker opens again: the other tasks wait in the queue.
        await healthy.drain(timeout_s=5)
        probe_wf = await client.submit(
            {"tasks": [{"id": f"x{i}", "capability": "t.llm", "max_attempts": 1} for i in range(4)]}
        )
        await eventually(lambda: len(runs["sick"]) == 4, timeout=30, what="one probe on the sick agent")
        await eventually(lambda: sick._breakers["t.llm"].state == "open", what="the breaker open again")
        assert len(runs["sick"]) == 4, "exactly one probe"

        # The dependency recovers: the next probe succeeds, the breaker closes, the agent consumes again
        # and takes the tasks that waited.
        broken = False
        done = await client.wait(probe_wf.workflow_id, timeout_s=60)
        assert sick._breakers["t.llm"].state == "closed"
        assert [t.status for t in done.tasks.values()].count("dead") == 1, "only the failed probe"
        assert len(runs["sick"]) == 7
