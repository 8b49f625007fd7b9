"""A circuit breaker per agent per capability: a failing agent stops taking the work, probes, recovers."""

from __future__ import annotations

import asyncio

import pytest

from fabric import Abort, Agent, FabricClient, Task
from fabric.protocol.messages import DEFAULT_PRIORITY
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
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
        assert sick.consumers.breakers["t.llm"].state == "open"
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
        await eventually(
            lambda: sick.consumers.breakers["t.llm"].state == "open", what="the breaker open again"
        )
        assert len(runs["sick"]) == 4, "exactly one probe"

        # The dependency recovers: the next probe succeeds, the breaker closes, the agent consumes again
        # and takes the tasks that waited.
        broken = False
        done = await client.wait(probe_wf.workflow_id, timeout_s=60)
        assert sick.consumers.breakers["t.llm"].state == "closed"
        assert [t.status for t in done.tasks.values()].count("dead") == 1, "only the failed probe"
        assert len(runs["sick"]) == 7


def _breaker_settings(settings: FabricSettings, *, failures: int, cooldown_s: float) -> FabricSettings:
    worker = settings.worker.model_copy(
        update={"breaker_failures": failures, "breaker_cooldown_s": cooldown_s}
    )
    return settings.model_copy(update={"worker": worker})


def _flaky(name: str, capability: str, broken: list[bool]) -> Agent:
    """An agent that fails every task while ``broken[0]`` is true."""
    agent = Agent(name)

    @agent.handler(capability)
    async def call(task: Task) -> str:
        if broken[0]:
            raise ValueError("always fails")
        return name

    return agent


async def test_probe_handed_back_for_avoiding_this_agent_does_not_strand_the_capability(
    settings: FabricSettings, client: FabricClient, router: Router, extra_caps: list[str]
) -> None:
    # One agent, failing everything: its retries come back naming it in fabric-avoid. When such a retry
    # is the half-open breaker's probe, the agent hands it back (no outcome) and must probe again.
    extra_caps.append("t.fail")
    broken = [True]
    sick = _breaker_settings(settings, failures=3, cooldown_s=2.0)
    async with Worker(_flaky("lonely", "t.fail", broken), sick) as worker:
        accepted = [
            await client.submit({"tasks": [{"id": "f", "capability": "t.fail", "max_attempts": 2}]})
            for _ in range(8)
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        for workflow in accepted:
            done = await client.wait(workflow.workflow_id, timeout_s=max(1.0, deadline - loop.time()))
            assert done.status == "failed"
        # The capability is consumed again: once the agent recovers, its probe closes the breaker.
        broken[0] = False
        healed = await client.run(
            {"tasks": [{"id": "ok", "capability": "t.fail"}]}, timeout_s=max(30.0, deadline - loop.time())
        )
        assert healed.tasks["ok"].result == "lonely"
        await eventually(lambda: worker.consumers.of["t.fail"].healthy, what="consuming t.fail again")
        assert worker.consumers.breakers["t.fail"].state == "closed"


@pytest.mark.parametrize("kind", ["malformed", "cancelled", "aborted"])
async def test_a_probe_that_ends_without_an_outcome_lets_the_next_task_probe(
    kind: str,
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    # The first task fetched after the cool-down says nothing about the agent's health: it is parked
    # unrun (malformed), skipped (cancelled) or aborted by its handler. The task behind it must probe.
    extra_caps.append("t.probe")
    runs: list[str] = []
    agent = Agent("prober")

    @agent.handler("t.probe")
    async def call(task: Task) -> str:
        runs.append(str(task.input))
        if task.input == "fail":
            raise ConnectionError("model endpoint unreachable")
        if task.input == "abort":
            raise Abort("the input is not ours to take")
        return "ok"

    one_failure = _breaker_settings(settings, failures=1, cooldown_s=3.0)
    async with Worker(agent, one_failure, concurrency=2) as worker:
        breaker = worker.consumers.breakers["t.probe"]
        opener = await client.submit(
            {"tasks": [{"id": "t", "capability": "t.probe", "input": "fail", "max_attempts": 1}]}
        )
        await client.wait(opener.workflow_id, timeout_s=60)
        assert breaker.state == "open"
        # Queued while the breaker is open, in this order: the probe that says nothing, then a good task.
        if kind == "malformed":
            # Ahead of the good task in the priority queue, as any task published before it would be.
            exchange = names.tasks_exchange(settings.namespace)
            await broker.publish(exchange, "t.probe", b"\xc1 not a task", priority=DEFAULT_PRIORITY)
        else:
            first = await client.submit(
                {
                    "tasks": [
                        {"id": "t", "capability": "t.probe", "input": "abort" if kind == "aborted" else kind}
                    ]
                }
            )
            if kind == "cancelled":
                await client.cancel(first.workflow_id)
        good = await client.submit({"tasks": [{"id": "t", "capability": "t.probe", "input": "good"}]})
        done = await client.wait(good.workflow_id, timeout_s=60)
        assert done.status == "succeeded"
        assert breaker.state == "closed"
        await eventually(lambda: worker.consumers.of["t.probe"].healthy, what="consuming t.probe again")
        expected = ["fail", "abort", "good"] if kind == "aborted" else ["fail", "good"]
        assert runs == expected, "the probe that said nothing went first, the good task probed after it"


async def test_why_says_circuit_open_for_a_retry_back_in_its_queue(
    settings: FabricSettings, client: FabricClient, router: Router, extra_caps: list[str]
) -> None:
    # The first attempt fails and opens the breaker (one failure, a long cool-down); its retry comes back
    # to the capability queue a second later, where no one takes it. `why` names the open breaker, not a
    # backoff that ended long ago.
    extra_caps.append("t.tripped")
    long_open = _breaker_settings(settings, failures=1, cooldown_s=300.0)
    async with Worker(_flaky("tripped", "t.tripped", [True]), long_open) as worker:
        accepted = await client.submit({"tasks": [{"id": "t", "capability": "t.tripped", "max_attempts": 2}]})

        async def circuit_open() -> dict[str, object] | None:
            (answer,) = await client.why(accepted.workflow_id)
            return answer if answer["reason"] == "circuit_open" else None

        answer = await eventually(circuit_open, what="why to name the open breaker")
        assert answer["status"] == "retrying"
        assert answer["breakers"] == {worker.agent_id: "open"}
        assert answer["agents"] == [worker.agent_id]
        assert "attempt 1 failed (ValueError: always fails)" in str(answer["detail"])
        assert "next attempt in" not in str(answer["detail"])
