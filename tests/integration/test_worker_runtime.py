"""The worker runtime on the real broker: one prefetch limit across capabilities, handlers that raise
CancelledError or their own TimeoutError, sync handlers past their timeout, drain, publish failures and
results the router could not decode."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fabric import Agent, FabricClient, Task
from fabric.errors import TransportError
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from fabric.worker.settlement import NACK_PAUSE_S
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from tests.integration.test_health import http_get

pytestmark = pytest.mark.rabbitmq

CAPS = ["wr.a", "wr.b", "wr.c"]


def task_is(
    client: FabricClient, workflow_id: str, task_id: str, *, status: str, agent: str | None = None
) -> Callable[[], Awaitable[bool]]:
    """A predicate for `eventually`: the task has ``status`` (and ran on ``agent``)."""

    async def check() -> bool:
        task = (await client.status(workflow_id))["tasks"][task_id]
        return bool(task["status"] == status and (agent is None or task["agent"] == agent))

    return check


def consumers_gone(broker: AmqpConnection, settings: FabricSettings) -> Callable[[], Awaitable[bool]]:
    """A predicate: no consumer is left on any of the CAPS queues."""

    async def check() -> bool:
        for cap in CAPS:
            info = await broker.queue_info(names.capability_queue(settings.namespace, cap))
            if info is None or info.consumers:
                return False
        return True

    return check


def three_capabilities(name: str, run: Callable[[Task], Awaitable[Any]]) -> Agent:
    agent = Agent(name)
    for cap in CAPS:
        agent.handler(cap)(run)
    return agent


# -- 1. one prefetch limit across capabilities ---------------------------------------------------


async def test_worker_holds_at_most_concurrency_tasks_across_its_capabilities(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    settings: FabricSettings,
    extra_caps: list[str],
) -> None:
    extra_caps.extend(CAPS)
    release = asyncio.Event()

    async def run(task: Task) -> str:
        if task.input == "long":
            await release.wait()
        return task.agent_id

    agent = three_capabilities("multi", run)
    try:
        busy = await start_worker(agent, concurrency=1, agent_id="busy")
        long = await client.submit({"tasks": [{"id": "long", "capability": "wr.a", "input": "long"}]})
        await eventually(
            task_is(client, long.workflow_id, "long", status="running", agent="busy"),
            what="the long task running on the busy worker",
        )
        queued = await client.submit({"tasks": [{"id": cap, "capability": cap} for cap in CAPS]})

        async def all_in_their_queues() -> bool:
            for cap in CAPS:
                info = await broker.queue_info(names.capability_queue(settings.namespace, cap))
                if info is None or info.messages != 1:
                    return False
            return True

        # The busy worker holds its one running task and no other: the three wait in their queues.
        await eventually(all_in_their_queues, timeout=10, what="each queued task left in its queue")
        assert busy.in_flight == 1
        await start_worker(agent, concurrency=1, agent_id="idle")
        done = await client.wait(queued.workflow_id, timeout_s=20)
        assert done.status == "succeeded"
        assert {t: done.tasks[t].agent for t in CAPS} == dict.fromkeys(CAPS, "idle")
        assert {t: done.tasks[t].result for t in CAPS} == dict.fromkeys(CAPS, "idle")
    finally:
        release.set()
    finished = await client.wait(long.workflow_id, timeout_s=20)
    assert finished.tasks["long"].agent == "busy"


# -- 2. a handler raising CancelledError ---------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_handler_raising_cancelled_error_fails_its_task_and_the_worker_goes_on(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    sync: bool,
) -> None:
    extra_caps.extend(["wr.cancel", "wr.echo"])
    agent = Agent("canceller")

    if sync:

        @agent.handler("wr.cancel")
        def cancel_sync(task: Task) -> None:
            raise asyncio.CancelledError("the handler gave up")

    else:

        @agent.handler("wr.cancel")
        async def cancel_async(task: Task) -> None:
            raise asyncio.CancelledError("the handler gave up")

    @agent.handler("wr.echo")
    async def echo(task: Task) -> Any:
        return task.input

    # Concurrency 1: a delivery left unsettled would block every task after it.
    worker = await start_worker(agent, concurrency=1)
    done = await client.run(
        {"tasks": [{"id": "c", "capability": "wr.cancel", "max_attempts": 1}]}, timeout_s=20
    )
    assert done.status == "failed"
    error = done.tasks["c"].error
    assert error is not None
    assert (error.type, error.message) == ("CancelledError", "the handler gave up")
    after = await client.run({"tasks": [{"id": "e", "capability": "wr.echo", "input": 5}]}, timeout_s=20)
    assert after.tasks["e"].result == 5
    assert (worker.processed, worker.failed) == (1, 1)
    await eventually(lambda: worker.in_flight == 0, timeout=10, what="no task left in flight")


# -- 3. sync handlers past their timeout keep their slot -----------------------------------------


async def test_sync_handlers_past_their_timeout_keep_their_slots_and_later_tasks_wait(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("wr.nap")
    agent = Agent("napper")

    @agent.handler("wr.nap")
    def nap(task: Task) -> float:
        time.sleep(task.input)  # never looks at task.cancelled
        return float(task.input)

    worker = await start_worker(agent, concurrency=2)
    slow = await client.run(
        {
            "tasks": [
                {"id": f"slow{i}", "capability": "wr.nap", "input": 3, "timeout_s": 0.5, "max_attempts": 1}
                for i in range(2)
            ]
        },
        timeout_s=20,
    )
    for i in range(2):
        error = slow.tasks[f"slow{i}"].error
        assert error is not None
        assert (error.type, error.message) == ("TimeoutError", "task exceeded its timeout of 0.5s")
    assert worker.overdue_threads == 2
    # Both slots stay taken by the sleeping threads: the quick tasks wait for them instead of starting
    # into a starved thread pool and timing out without ever running.
    quick = await client.run(
        {
            "tasks": [
                {"id": f"quick{i}", "capability": "wr.nap", "input": 0, "timeout_s": 1} for i in range(4)
            ]
        },
        timeout_s=30,
    )
    assert quick.status == "succeeded", {t: s.error for t, s in quick.tasks.items()}
    assert all(quick.tasks[f"quick{i}"].result == 0 for i in range(4))
    await eventually(lambda: worker.overdue_threads == 0, timeout=10, what="the overdue threads returned")


# -- 4. drain: tasks not started go back to their queues -----------------------------------------


async def test_drain_returns_prefetched_tasks_unstarted(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    settings: FabricSettings,
    extra_caps: list[str],
) -> None:
    extra_caps.extend(CAPS)
    runs: list[tuple[str, str]] = []

    async def run(task: Task) -> str:
        runs.append((task.agent_id, task.task_id))
        await asyncio.sleep(1)
        return task.agent_id

    agent = three_capabilities("drainer", run)
    first = await start_worker(agent, concurrency=1, agent_id="first")
    accepted = await client.submit({"tasks": [{"id": cap, "capability": cap} for cap in CAPS]})
    await eventually(lambda: len(runs) == 1, what="the first task running")
    drained = asyncio.create_task(first.drain())
    await eventually(consumers_gone(broker, settings), timeout=10, what="the first worker's consumers gone")
    port = first.http_port
    assert port is not None
    status, body = await http_get(port, "/readyz")
    assert status == 503, body
    assert json.loads(body)["checks"]["consumers"] == "draining"
    await start_worker(agent, concurrency=1, agent_id="second")
    done = await client.wait(accepted.workflow_id, timeout_s=30)
    await asyncio.wait_for(drained, 10)
    assert done.status == "succeeded"
    assert runs[0][0] == "first"
    assert [agent_id for agent_id, _ in runs[1:]] == ["second", "second"]
    assert sorted(task_id for _, task_id in runs) == CAPS  # each exactly once
    assert {t: done.tasks[t].agent for t in CAPS} == {t: a for a, t in runs}


async def test_drain_returns_a_task_waiting_behind_an_overdue_sync_handler(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    settings: FabricSettings,
    extra_caps: list[str],
) -> None:
    extra_caps.extend([*CAPS, "wr.stuck"])
    runs: list[tuple[str, str]] = []
    unstick = threading.Event()

    async def run(task: Task) -> str:
        runs.append((task.agent_id, task.task_id))
        return task.agent_id

    agent = three_capabilities("behind", run)

    @agent.handler("wr.stuck")
    def stuck(task: Task) -> None:
        unstick.wait(30)

    try:
        first = await start_worker(agent, concurrency=1, agent_id="first")
        timed_out = await client.run(
            {"tasks": [{"id": "stuck", "capability": "wr.stuck", "timeout_s": 0.3, "max_attempts": 1}]},
            timeout_s=20,
        )
        assert timed_out.status == "failed"
        assert first.overdue_threads == 1
        accepted = await client.submit({"tasks": [{"id": "q", "capability": "wr.a"}]})
        # The task is delivered (its predecessor was acked) but waits for the slot the thread holds.
        await eventually(lambda: first.in_flight == 1, timeout=10, what="the task waiting for a slot")
        # The task was never started, so the drain returns it at once rather than waiting (up to the
        # drain deadline) for the slot the stuck thread holds.
        drained = asyncio.create_task(first.drain(timeout_s=60))
        await eventually(drained.done, timeout=5, what="the drain finished without waiting for the slot")
        await drained
        await eventually(
            consumers_gone(broker, settings), timeout=10, what="the first worker's consumers gone"
        )
        await start_worker(agent, concurrency=1, agent_id="second")
        done = await client.wait(accepted.workflow_id, timeout_s=20)
    finally:
        unstick.set()
    assert done.tasks["q"].agent == "second"
    assert runs == [("second", "q")]


# -- 5. events that cannot be published ----------------------------------------------------------


@pytest.mark.parametrize("failing", ["started", "succeeded"])
async def test_unpublishable_event_nacks_the_task_after_a_pause(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    extra_caps.append("wr.echo")
    agent = Agent("reporter")

    @agent.handler("wr.echo")
    async def echo(task: Task) -> Any:
        return task.input

    worker = await start_worker(agent, concurrency=1)
    amqp = worker._amqp
    publish = amqp.publish
    started_at: list[float] = []
    refused: list[str] = []
    loop = asyncio.get_running_loop()

    async def refusing_publish(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
        if routing_key == names.event_routing_key("started"):
            started_at.append(loop.time())
        if routing_key == names.event_routing_key(failing) and not refused:
            refused.append(routing_key)
            raise TransportError("the broker refused the publish (test)")
        await publish(exchange, routing_key, body, **kwargs)

    monkeypatch.setattr(amqp, "publish", refusing_publish)
    done = await client.run({"tasks": [{"id": "e", "capability": "wr.echo", "input": 3}]}, timeout_s=20)
    assert done.tasks["e"].result == 3
    assert refused == [names.event_routing_key(failing)]
    assert len(started_at) == 2
    # Redelivered only after the pause, not in a hot loop.
    assert started_at[1] - started_at[0] >= NACK_PAUSE_S * 0.9


# -- 6. the handler's own TimeoutError ------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_handlers_own_timeout_error_is_not_reported_as_the_task_timeout(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    sync: bool,
) -> None:
    extra_caps.append("wr.call")
    agent = Agent("caller")

    if sync:

        @agent.handler("wr.call")
        def call_sync(task: Task) -> None:
            raise TimeoutError("the model API did not answer in 2s")

    else:

        @agent.handler("wr.call")
        async def call_async(task: Task) -> None:
            raise TimeoutError("the model API did not answer in 2s")

    await start_worker(agent, concurrency=1)
    done = await client.run(
        {"tasks": [{"id": "c", "capability": "wr.call", "timeout_s": 30, "max_attempts": 1}]}, timeout_s=20
    )
    error = done.tasks["c"].error
    assert error is not None
    assert (error.type, error.message) == ("TimeoutError", "the model API did not answer in 2s")


async def test_sync_handler_exceeding_its_timeout_is_reported_as_the_task_timeout(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("wr.slow")
    agent = Agent("slowpoke")

    @agent.handler("wr.slow")
    def slow(task: Task) -> None:
        task.cancelled.wait(30)  # cooperative: stops once the timeout sets the flag

    worker = await start_worker(agent, concurrency=1)
    done = await client.run(
        {"tasks": [{"id": "s", "capability": "wr.slow", "timeout_s": 0.3, "max_attempts": 1}]}, timeout_s=20
    )
    error = done.tasks["s"].error
    assert error is not None
    assert (error.type, error.message) == ("TimeoutError", "task exceeded its timeout of 0.3s")
    await eventually(lambda: worker.overdue_threads == 0, timeout=10, what="the cooperative handler stopped")


# -- 7. results the router could not decode -------------------------------------------------------


async def test_result_that_does_not_survive_msgpack_fails_the_task(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append("wr.tuple")
    agent = Agent("tupler")

    @agent.handler("wr.tuple")
    async def tuple_key(task: Task) -> dict[Any, str]:
        return {(1, 2): "x"}

    worker = await start_worker(agent, concurrency=1)
    done = await client.run({"tasks": [{"id": "t", "capability": "wr.tuple"}]}, timeout_s=20)
    assert done.status == "failed"
    error = done.tasks["t"].error
    assert error is not None
    assert error.type == "ResultNotSerializable"
    assert "msgpack" in error.message
    assert (worker.processed, worker.failed) == (0, 1)
