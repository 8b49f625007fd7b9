"""Reassignment: a retry prefers another agent; a handler's Reassign demands one."""

from __future__ import annotations

from collections import Counter

import pytest

from fabric import Agent, FabricClient, Reassign, Task
from fabric.policy import RetryPolicy
from fabric.router.service import Router
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq


def two_agents(runs: dict[str, Counter[str]], signal: bool) -> tuple[Agent, Agent]:
    def make(name: str) -> Agent:
        agent = Agent(name)

        @agent.handler("t.gpu")
        async def render(task: Task) -> str:
            runs[name][task.task_id] += 1
            if name == "bad":
                if signal:
                    raise Reassign("this GPU is out of memory")
                raise RuntimeError("CUDA error")
            return name

        return agent

    return make("bad"), make("good")


async def test_retries_go_to_the_other_agent(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("t.gpu")
    runs: dict[str, Counter[str]] = {"bad": Counter(), "good": Counter()}
    bad, good = two_agents(runs, signal=False)
    await start_worker(bad, concurrency=2, agent_id="bad", policy=RetryPolicy({"1s": 1000}))
    await start_worker(good, concurrency=2, agent_id="good")
    done = await client.run(
        {"tasks": [{"id": f"t{i}", "capability": "t.gpu"} for i in range(12)]}, timeout_s=90
    )
    assert done.status == "succeeded"
    assert all(outcome.result == "good" for outcome in done.tasks.values())
    assert all(n == 1 for n in runs["bad"].values()), f"a task ran twice on the failing agent: {runs['bad']}"


async def test_reassign_signal_with_no_other_agent_parks_the_task(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("t.gpu")
    runs: dict[str, Counter[str]] = {"bad": Counter(), "good": Counter()}
    bad, _ = two_agents(runs, signal=True)
    await start_worker(bad, agent_id="bad")
    done = await client.run(
        {"tasks": [{"id": "only", "capability": "t.gpu", "max_attempts": 5}]}, timeout_s=60
    )
    task = done.tasks["only"]
    assert task.status == "dead"
    assert task.error is not None
    assert task.error.type == "NoOtherAgent"
    assert runs["bad"]["only"] == 1, "the agent that asked for reassignment never ran it again"


async def test_reassign_signal_moves_the_task_at_once(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("t.gpu")
    runs: dict[str, Counter[str]] = {"bad": Counter(), "good": Counter()}
    bad, good = two_agents(runs, signal=True)
    await start_worker(bad, agent_id="bad")
    await start_worker(good, agent_id="good")
    done = await client.run(
        {"tasks": [{"id": f"t{i}", "capability": "t.gpu"} for i in range(8)]}, timeout_s=60
    )
    assert all(outcome.result == "good" for outcome in done.tasks.values())
    assert all(n == 1 for n in runs["bad"].values())
