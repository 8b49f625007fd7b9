"""Agent scoring on the real broker: each worker consumes with its score as ``x-priority``; the healthier
agent gets more of a burst; changing the priority loses and duplicates nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from fabric import Agent, FabricClient, Task
from fabric.policy.score import MAX_SCORE, MIN_SCORE
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.worker.runtime import Worker
from tests.conftest import eventually

pytestmark = pytest.mark.rabbitmq

CAP = "t.scored"
BURST = 20


def _tuned(settings: FabricSettings, **worker: Any) -> FabricSettings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=worker)})


async def test_the_healthier_agent_receives_more_of_a_burst(
    settings: FabricSettings, client: FabricClient, router: Router, extra_caps: list[str]
) -> None:
    extra_caps.append(CAP)
    runs: dict[str, list[str]] = {"poor": [], "healthy": []}

    def make(name: str) -> Agent:
        agent = Agent(name)

        @agent.handler(CAP)
        async def work(task: Task) -> str:
            runs[name].append(task.task_id)
            if task.input == "fail":
                raise ConnectionError("model endpoint unreachable")
            await asyncio.sleep(0.05)
            return name

        return agent

    # No breaker in the way (the failures must lower the score, not stop the consumer); re-scoring at
    # every heartbeat instead of at most every 30 s.
    tuned = _tuned(settings, breaker_failures=1000, rescore_min_interval_s=0.0)
    async with Worker(make("poor"), tuned, concurrency=BURST) as poor:
        consumer = poor.consumers.of[CAP]
        assert consumer.priority == MAX_SCORE, "no record yet: the top score"
        # Alone, the poor agent fails a batch of tasks: its success rate, and its score, drop.
        failing = await client.submit(
            {
                "tasks": [
                    {"id": f"f{i}", "capability": CAP, "input": "fail", "max_attempts": 1} for i in range(8)
                ]
            }
        )
        await client.wait(failing.workflow_id, timeout_s=60)
        await eventually(
            lambda: consumer.priority == MIN_SCORE, timeout=30, what="the poor agent's score to drop"
        )

        async with Worker(make("healthy"), tuned, concurrency=BURST) as healthy:

            async def scores_recorded() -> bool:
                found = {a["agent_id"]: a for a in await client.query("agents")}
                score_of = {
                    worker.agent_id: (found.get(worker.agent_id) or {})
                    .get("consumers", {})
                    .get(CAP, {})
                    .get("score")
                    for worker in (poor, healthy)
                }
                return score_of == {poor.agent_id: MIN_SCORE, healthy.agent_id: MAX_SCORE}

            await eventually(scores_recorded, timeout=30, what="both scores in the agent registry")
            # Both agents are free: with equal priorities the broker would deal the burst round-robin
            # (about 10 each); the higher priority takes it while it has room.
            runs["poor"].clear()
            runs["healthy"].clear()
            done = await client.run(
                {"tasks": [{"id": f"b{i}", "capability": CAP, "input": i} for i in range(BURST)]},
                timeout_s=60,
            )
            assert done.status == "succeeded"
            ran_on = Counter(t.result for t in done.tasks.values())
            assert ran_on["healthy"] >= 0.75 * BURST, ran_on
            assert ran_on["poor"] <= 0.25 * BURST, ran_on
            assert len(runs["healthy"]) + len(runs["poor"]) == BURST, "each task ran once"
            # Hysteresis: the scores moved a few times, not at every heartbeat.
            assert consumer.subscriptions <= 4
            assert healthy.consumers.of[CAP].subscriptions <= 4


async def test_changing_the_priority_loses_and_duplicates_no_delivery(
    settings: FabricSettings, client: FabricClient, router: Router, extra_caps: list[str]
) -> None:
    """basic.cancel leaves delivered messages unacked on the channel: a worker that re-subscribes with
    another priority while tasks run and arrive acks every one of them once, and none comes back
    redelivered (which would count as a lost attempt)."""
    extra_caps.append(CAP)
    runs: list[str] = []
    agent = Agent("steady")

    @agent.handler(CAP)
    async def work(task: Task) -> int:
        runs.append(task.task_id)
        await asyncio.sleep(0.1)
        return task.attempt

    async with Worker(agent, settings, concurrency=4) as worker:
        consumer = worker.consumers.of[CAP]
        accepted = await client.submit({"tasks": [{"id": f"t{i}", "capability": CAP} for i in range(40)]})
        waiting = asyncio.create_task(client.wait(accepted.workflow_id, timeout_s=120))
        priority = 2
        while not waiting.done():
            await consumer.set_priority(priority)
            priority = 2 + (priority - 1) % 8  # 2..9, never the current one
            await asyncio.wait({waiting}, timeout=0.05)
        done = await waiting
    assert consumer.subscriptions > 10, "the priority really changed many times while tasks flowed"
    assert done.status == "succeeded"
    assert sorted(runs) == sorted(f"t{i}" for i in range(40)), "every task ran exactly once"
    assert all(t.attempts == 1 and t.result == 1 for t in done.tasks.values()), "nothing redelivered"
