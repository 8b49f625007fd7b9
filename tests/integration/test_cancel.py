"""Cancellation: queued tasks are skipped, running ones stopped, the workflow ends cancelled."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fabric import Agent, FabricClient, Retry, Task
from fabric.protocol import codec
from fabric.protocol.messages import EventStatus, TaskEvent, TaskStatus
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from fabric.worker.runtime import Worker
from tests.conftest import cli, eventually
from tests.integration.conftest import StartWorker
from tests.integration.test_reconnect import through
from tests.proxy import TcpProxy
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


# -- copies of cancelled tasks (issue 11, bug 2) --------------------------------------------------------


def samples(text: str, name: str) -> dict[str, float]:
    """Non-zero samples of the counter ``name`` in a Prometheus text exposition, by capability."""
    return {
        sample.labels.get("capability", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.value
    }


class Counting:
    """An agent whose handler fails every time (so a copy that runs is retried, then parked) and
    records every call."""

    def __init__(self, name: str, capability: str, *, delay_s: float | None = None) -> None:
        self.agent = Agent(name)
        self.calls: list[tuple[str, str, int]] = []

        @self.agent.handler(capability)
        async def fail(task: Task) -> None:
            self.calls.append((task.workflow_id, task.task_id, task.attempt))
            if delay_s is not None:
                raise Retry("try later", delay_s=delay_s)
            raise RuntimeError("this copy should never have run")


async def nothing_parked(router: Router, broker: AmqpConnection, worker: Worker, ns: str) -> None:
    """No dead record, no parked message, and the parked counters agree (zero)."""
    assert (await router.store.query_dead()).items == []
    dead = await broker.queue_info(names.dead_queue(ns))
    assert dead is not None
    assert dead.messages == 0
    assert samples(router.render_metrics(), "fabric_tasks_parked_total") == {}
    assert samples(worker.render_metrics(), "fabric_worker_tasks_parked_total") == {}


async def no_recalls_left(router: Router) -> bool:
    return (await router.store.recalled()).items == []


async def test_a_worker_started_after_the_cancel_never_runs_the_queued_tasks(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    start_worker: StartWorker,
    extra_caps: list[str],
) -> None:
    extra_caps.append("t.late")
    counting = Counting("late", "t.late")
    tasks = [{"id": f"q{i}", "capability": "t.late", "max_attempts": 3} for i in range(3)]
    accepted = await client.submit({"tasks": tasks})  # no agent serves t.late yet: the tasks queue
    queue = names.capability_queue(settings.namespace, "t.late")

    async def queued() -> bool:
        info = await broker.queue_info(queue)
        return info is not None and info.messages == 3

    await eventually(queued, what="three tasks queued")
    outcome = await client.cancel(accepted.workflow_id)
    assert sorted(outcome["cancelled"]) == ["q0", "q1", "q2"]
    assert len((await router.store.recalled()).items) == 3

    worker = await start_worker(counting.agent)

    async def drained() -> bool:
        info = await broker.queue_info(queue)
        return info is not None and info.messages == 0 and await no_recalls_left(router)

    # Each copy is dropped and reported; the report clears the task's recall flag.
    await eventually(drained, timeout=30, what="the three copies dropped")
    assert counting.calls == []
    assert worker.processed == worker.failed == 0
    status = await client.status(accepted.workflow_id)
    assert status["status"] == "cancelled"
    await nothing_parked(router, broker, worker, settings.namespace)


async def test_tasks_in_the_delay_queue_at_the_cancel_never_run_again(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    start_worker: StartWorker,
    extra_caps: list[str],
) -> None:
    extra_caps.append("t.later")
    counting = Counting("later", "t.later", delay_s=5)
    first = await start_worker(counting.agent, agent_id="first")
    accepted = await client.submit(
        {"tasks": [{"id": f"d{i}", "capability": "t.later", "max_attempts": 3} for i in range(2)]}
    )

    async def waiting_for_retry() -> bool:
        counts = (await client.status(accepted.workflow_id))["counts"]
        return counts.get("retrying") == 2

    await eventually(waiting_for_retry, what="both tasks in the delay queue")
    # The worker that heard the broadcast is gone before the copies come back: only a worker started
    # after the cancel is there to get them.
    await first.drain()
    await client.cancel(accepted.workflow_id)
    assert len((await router.store.recalled()).items) == 2
    second = await start_worker(counting.agent, agent_id="second")

    await eventually(lambda: no_recalls_left(router), timeout=30, what="both copies back and dropped")
    assert sorted(counting.calls) == [(accepted.workflow_id, "d0", 1), (accepted.workflow_id, "d1", 1)]
    await nothing_parked(router, broker, second, settings.namespace)


async def test_a_running_worker_drops_handed_back_copies_after_the_broadcast(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    start_worker: StartWorker,
    extra_caps: list[str],
) -> None:
    extra_caps.append("t.again")
    counting = Counting("again", "t.again", delay_s=1)
    worker = await start_worker(counting.agent)
    accepted = await client.submit({"tasks": [{"id": "r", "capability": "t.again", "max_attempts": 5}]})
    await eventually(lambda: len(counting.calls) == 1, what="the first attempt")
    await client.cancel(accepted.workflow_id)
    # The retry comes back naming this agent in fabric-avoid (it would be handed back): dropped instead.
    await eventually(lambda: no_recalls_left(router), timeout=30, what="the retry's copy dropped")
    assert counting.calls == [(accepted.workflow_id, "r", 1)]
    await nothing_parked(router, broker, worker, settings.namespace)


async def test_an_event_for_a_cancelled_task_broadcasts_the_cancel_again_and_counts_nothing(
    settings: FabricSettings, client: FabricClient, router: Router, broker: AmqpConnection
) -> None:
    ns = settings.namespace
    heard: list[dict[str, object]] = []

    async def on_control(delivery: Delivery) -> None:
        heard.append(codec.decode(delivery.body))
        await delivery.ack()

    control = await broker.reply_queue(on_control, prefetch=10)
    await control.bind(names.control_exchange(ns), "")
    accepted = await client.submit({"tasks": [{"id": "a", "capability": "demo.echo"}]})  # no worker
    await client.cancel(accepted.workflow_id)
    wid = accepted.workflow_id
    await eventually(lambda: len(heard) == 1, what="the cancel broadcast")
    assert heard[0] == {"kind": "cancel", "workflow_id": wid, "task_ids": ["a"]}

    async def report(status: EventStatus) -> None:
        event = TaskEvent(workflow_id=wid, task_id="a", attempt=3, agent_id="old", status=status, at=1.0)
        body = codec.encode(event.model_dump(mode="python", exclude_none=True))
        await broker.publish(names.events_exchange(ns), names.event_routing_key(str(status)), body)

    # A worker that never heard of the cancel ran a copy to its end and parked it.
    await report(EventStatus.DEAD)
    await eventually(lambda: len(heard) == 2, what="the cancel broadcast again")
    assert heard[1] == heard[0]
    task = (await router.store.get_tasks(wid))["a"]
    assert (task.status, task.recall) == (TaskStatus.CANCELLED, True)
    assert samples(router.render_metrics(), "fabric_tasks_parked_total") == {}
    # A worker reports a copy dropped: the flag is cleared, nothing is broadcast.
    await report(EventStatus.CANCELLED)
    await eventually(lambda: no_recalls_left(router), what="the recall flag cleared")
    assert len(heard) == 2
    assert (await client.status(wid))["status"] == "cancelled"


async def test_a_worker_that_reconnects_asks_for_the_cancels_it_missed(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    parsed = urlparse(settings.amqp_url.get_secret_value())
    extra_caps.append("t.missed")
    counting = Counting("missed", "t.missed")
    async with (
        TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672) as proxy,
        Worker(counting.agent, through(settings, proxy)) as worker,
    ):
        await eventually(lambda: worker._cancels.syncs == 1, what="the first sync")
        proxy.refusing = True
        await proxy.cut()
        await eventually(lambda: not worker._amqp.connected, what="the worker cut off")
        # Submitted and cancelled while the worker cannot hear the broadcast.
        accepted = await client.submit({"tasks": [{"id": "m", "capability": "t.missed"}]})
        await client.cancel(accepted.workflow_id)
        proxy.refusing = False
        await eventually(lambda: worker._cancels.syncs == 2, timeout=60, what="the sync after reconnecting")
        await eventually(lambda: no_recalls_left(router), timeout=30, what="the copy dropped")
        assert counting.calls == []
        await nothing_parked(router, broker, worker, settings.namespace)
