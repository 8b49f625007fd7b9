"""Retries wait in the broker's delay queues; tasks out of attempts are parked on {ns}.dead."""

from __future__ import annotations

import time

import pytest

from fabric import Abort, Agent, FabricClient, Retry, Task
from fabric.policy import RetryPolicy
from fabric.protocol import codec, headers
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq


async def parked(broker: AmqpConnection, settings: FabricSettings, count: int) -> list[Delivery]:
    """Read ``count`` messages from {ns}.dead (acked: the test consumes them)."""
    found: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        found.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(names.dead_queue(settings.namespace), collect, prefetch=10)
    try:
        await eventually(lambda: len(found) >= count, what=f"{count} parked message(s)")
    finally:
        await consumer.cancel()
    return found


async def test_flaky_task_succeeds_on_attempt_three_after_the_tier_delays(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    agent = Agent("flaky")
    extra_caps.append("t.flaky")
    starts: list[float] = []

    @agent.handler("t.flaky")
    async def flaky(task: Task) -> int:
        starts.append(time.monotonic())
        if task.attempt <= 2:
            raise ConnectionError(f"upstream hiccup {task.attempt}")
        return task.attempt

    await start_worker(agent)
    done = await client.run(
        {"tasks": [{"id": "f", "capability": "t.flaky", "max_attempts": 5}]}, timeout_s=60
    )
    assert done.status == "succeeded"
    assert done.tasks["f"].result == 3
    assert done.tasks["f"].attempts == 3
    assert len(starts) == 3
    first_wait, second_wait = starts[1] - starts[0], starts[2] - starts[1]
    # Tiers 1s then 5s, each message expiring after 80-100 % of its tier (jitter), +-20 %.
    assert 0.8 <= first_wait <= 1.2 * 1.0 + 0.3, first_wait
    assert 4.0 <= second_wait <= 1.2 * 5.0, second_wait
    status = await client.status(done.workflow_id)
    history = status["tasks"]["f"]["history"]
    assert [(h["attempt"], h["error"]["type"], h["error"]["message"]) for h in history] == [
        (1, "ConnectionError", "upstream hiccup 1"),
        (2, "ConnectionError", "upstream hiccup 2"),
    ]


async def test_always_failing_task_is_parked_after_exactly_max_attempts(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    agent = Agent("broken")
    extra_caps.append("t.broken")
    attempts: list[int] = []

    @agent.handler("t.broken")
    async def broken(task: Task) -> None:
        attempts.append(task.attempt)
        raise RuntimeError(f"still broken on attempt {task.attempt}")

    # Only the 1s tier, so the test waits 3 s rather than 36 s; the tier ladder is tested above.
    await start_worker(agent, policy=RetryPolicy({"1s": 1_000}))
    done = await client.run(
        {
            "tasks": [
                {"id": "b", "capability": "t.broken", "max_attempts": 4},
                {"id": "after", "capability": "t.broken", "depends_on": ["b"]},
            ]
        },
        timeout_s=60,
    )
    assert attempts == [1, 2, 3, 4]
    assert done.status == "failed"
    task = done.tasks["b"]
    assert (task.status, task.attempts) == ("dead", 4)
    assert task.error is not None
    assert task.error.message == "still broken on attempt 4"
    assert done.tasks["after"].status == "upstream_failed"
    (message,) = await parked(broker, settings, 1)
    assert headers.get_str(message.headers, headers.DEAD_REASON) == "exhausted"
    assert headers.get_int(message.headers, headers.ATTEMPT, 0) == 4
    assert "still broken on attempt 4" in headers.get_str(message.headers, headers.LAST_ERROR)
    assert codec.decode(message.body)["input"] is None


async def test_handler_signals_choose_the_fate(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    agent = Agent("signals")
    extra_caps.extend(["t.abort", "t.later"])
    seen: list[tuple[str, int, float]] = []

    @agent.handler("t.abort")
    async def give_up(task: Task) -> None:
        seen.append((task.task_id, task.attempt, time.monotonic()))
        raise Abort("the document is not English")

    @agent.handler("t.later")
    def rate_limited(task: Task) -> str:
        seen.append((task.task_id, task.attempt, time.monotonic()))
        if task.attempt == 1:
            raise Retry("429 from the model provider", delay_s=2)
        return "ok"

    await start_worker(agent)
    done = await client.run(
        {"tasks": [{"id": "a", "capability": "t.abort"}, {"id": "l", "capability": "t.later"}]}, timeout_s=60
    )
    assert done.tasks["a"].status == "dead"
    assert done.tasks["a"].attempts == 1, "Abort parks at once, whatever max_attempts says"
    assert done.tasks["l"].status == "succeeded"
    later = [t for task_id, _, t in seen if task_id == "l"]
    assert 4.0 <= later[1] - later[0] <= 6.0, "Retry(delay_s=2) waits in the shortest tier >= 2 s: 5s"
    (message,) = await parked(broker, settings, 1)
    assert headers.get_str(message.headers, headers.DEAD_REASON) == "the document is not English"
