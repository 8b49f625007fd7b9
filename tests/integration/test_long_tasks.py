"""Long tasks on a broker whose consumer_timeout (2 s here, 30 min by default) they outlive.

RabbitMQ closes the consumer channel of a delivery left unacked past consumer_timeout and requeues every
unacked message on it while the handlers go on running. Each task must still run once in the worker and
be recorded once: a task still running after ``lease_after_s`` is acked and runs on under a lease; a copy
the broker delivers again while the attempt runs here is adopted, not run again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from fabric import Agent, FabricClient, Task
from fabric.protocol.messages import TaskStatus
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.worker.runtime import Worker
from tests.conftest import SHORT_CONSUMER_TIMEOUT_MS, eventually

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault]

CAPABILITY = "lt.work"
#: Longer than the node's consumer_timeout plus its 0.5 s tick: the broker would close the channel.
LONG_S = SHORT_CONSUMER_TIMEOUT_MS / 1000 * 3


@pytest.fixture
def amqp_url(short_timeout_amqp_url: str) -> str:
    return short_timeout_amqp_url


@pytest.fixture
def extra_caps() -> list[str]:
    return [CAPABILITY]


@pytest.fixture
def settings(settings: FabricSettings) -> FabricSettings:
    return settings.model_copy(
        update={"router": settings.router.model_copy(update={"lease_check_interval_s": 0.2})}
    )


def counting_agent(runs: Counter[str]) -> Agent:
    agent = Agent("longtasks")

    @agent.handler(CAPABILITY)
    async def work(task: Task) -> str:
        runs[task.task_id] += 1
        await asyncio.sleep(float(task.input))
        return task.task_id

    return agent


async def start(agent: Agent, settings: FabricSettings, **worker: float) -> Worker:
    custom = settings.model_copy(update={"worker": settings.worker.model_copy(update=worker)})
    return await Worker(agent, custom).__aenter__()


async def test_long_task_is_leased_and_runs_once(router: Router, settings: FabricSettings) -> None:
    runs: Counter[str] = Counter()
    worker = await start(counting_agent(runs), settings, lease_after_s=1.0, lease_ttl_s=3.0)
    try:
        async with FabricClient(settings, reply_timeout_s=60) as client:
            tasks = [{"id": "long", "capability": CAPABILITY, "input": LONG_S}]
            tasks += [{"id": f"short{i}", "capability": CAPABILITY, "input": 0.3} for i in range(4)]
            run = asyncio.create_task(client.run({"workflow_id": "wf-lease", "tasks": tasks}, timeout_s=60))

            async def leased() -> bool:
                found = await router.store.get_tasks("wf-lease", ["long"])
                task = found.get("long")
                return task is not None and task.status is TaskStatus.RUNNING and task.lease_s == 3.0

            await eventually(leased, timeout=30, what="the router to hold the long task's lease")
            done = await run
    finally:
        await worker.drain(timeout_s=5)

    assert done.status == "succeeded"
    assert {task_id: t.attempts for task_id, t in done.tasks.items()} == dict.fromkeys(done.tasks, 1)
    assert runs == Counter(dict.fromkeys(done.tasks, 1)), "every handler ran exactly once"
    assert worker.leased == 1, "only the long task outlived lease_after_s"
    assert worker.adopted == 0, "the broker never closed the channel: nothing came back"
    stored = await router.store.get_tasks("wf-lease")
    assert all(t.history == [] and t.lease_s is None for t in stored.values())
    assert await router.store.leased() == []


async def test_copies_redelivered_by_consumer_timeout_are_adopted_not_rerun(
    router: Router, settings: FabricSettings
) -> None:
    """No lease (lease_after_s beyond the task): the broker closes the channel under the long task, and
    under the short ones in flight with it; their copies come back and are adopted."""
    runs: Counter[str] = Counter()
    worker = await start(counting_agent(runs), settings, lease_after_s=600.0)
    try:
        async with FabricClient(settings, reply_timeout_s=60) as client:
            long_run = asyncio.create_task(
                client.run(
                    {
                        "workflow_id": "wf-long",
                        "tasks": [{"id": "long", "capability": CAPABILITY, "input": LONG_S}],
                    },
                    timeout_s=60,
                )
            )
            await eventually(lambda: runs["long"], what="the long task to start")
            started = time.monotonic()
            # Short tasks (shorter than consumer_timeout) that are in flight when the channel is closed:
            # they start a second into the long one and end after the broker's check (2 s + a 0.5 s tick).
            await eventually(lambda: time.monotonic() - started >= 1.0, what="a second into the long task")
            shorts = [{"id": f"short{i}", "capability": CAPABILITY, "input": 1.8} for i in range(4)]
            done_short = await client.run({"workflow_id": "wf-short", "tasks": shorts}, timeout_s=60)
            done_long = await long_run
    finally:
        await worker.drain(timeout_s=5)

    assert worker.adopted >= 1 + len(shorts), "the broker closed the channel and the copies came back"
    assert done_long.status == done_short.status == "succeeded"
    assert runs == Counter({"long": 1, **dict.fromkeys(done_short.tasks, 1)}), "no handler ran twice"
    for done in (done_long, done_short):
        assert all(t.attempts == 1 for t in done.tasks.values())
    for workflow_id in ("wf-long", "wf-short"):
        stored = await router.store.get_tasks(workflow_id)
        assert all(t.history == [] for t in stored.values()), "no attempt counted as lost"
