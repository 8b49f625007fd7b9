"""Workflows end to end through an in-process router and workers on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aio_pika
import pytest

from fabric import Agent, FabricClient, SubmissionRejected, Task
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq

DIAMOND = {
    "tasks": [
        {"id": "a", "capability": "demo.sum", "input": 1},
        {"id": "b", "capability": "demo.sum", "input": 10, "depends_on": ["a"]},
        {"id": "c", "capability": "demo.sum", "input": 100, "depends_on": ["a"]},
        {"id": "d", "capability": "demo.sum", "input": 0, "depends_on": ["b", "c"]},
    ]
}


async def test_plain_amqp_json_submission_runs_the_dag_and_replies(
    settings: FabricSettings, router: Router, start_worker: StartWorker
) -> None:
    """Any AMQP client can submit: a JSON body published with aio-pika, no fabric SDK."""
    await start_worker(demo)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange(names.submit_exchange(settings.namespace))
        await exchange.publish(
            aio_pika.Message(
                json.dumps(DIAMOND).encode(),
                content_type="application/json",
                message_id="json-diamond-1",
                correlation_id="corr-1",
                reply_to=replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="workflow",
        )
        received: list[dict[str, Any]] = []
        async with replies.iterator(timeout=60) as messages:
            async for message in messages:
                async with message.process():
                    assert message.content_type == "application/json"
                    assert message.correlation_id == "corr-1"
                    received.append(json.loads(message.body))
                if received[-1]["kind"] != "accepted":
                    break
    finally:
        await connection.close()
    accepted, completed = received
    assert accepted == {"kind": "accepted", "workflow_id": completed["workflow_id"], "tasks": 4}
    assert completed["kind"] == "completed"
    assert completed["status"] == "succeeded"
    tasks = completed["tasks"]
    assert {t: tasks[t]["result"] for t in tasks} == {"a": 1, "b": 11, "c": 101, "d": 112}
    assert all(tasks[t]["attempts"] == 1 and tasks[t]["status"] == "succeeded" for t in tasks)
    assert all(tasks[t]["agent"] for t in tasks)


async def test_sdk_run_passes_upstream_results(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    done = await client.run(DIAMOND, timeout_s=60)
    assert done.status == "succeeded"
    assert done.tasks["d"].result == 112
    status = await client.status(done.workflow_id)
    assert status["status"] == "succeeded"
    assert status["counts"] == {"succeeded": 4}


async def test_task_notifications_reach_a_listener_in_order(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    """The router queues each task's new status and one sender publishes them to ``{ns}.notify``,
    oldest first: a listener bound at submission sees the tasks released after it bound run, then
    succeed."""
    await start_worker(demo)
    seen: list[tuple[str, str]] = []

    def listen(note: dict[str, Any]) -> None:
        seen.append((note["task_id"], note["status"]))

    accepted = await client.submit(DIAMOND, on_task=listen)

    await eventually(lambda: ("d", "succeeded") in seen, what="the notification that d succeeded")

    # b, c and d were released after the listener bound (a had to finish first): all of theirs came.
    for task in "bcd":
        assert [s for t, s in seen if t == task][-2:] == ["running", "succeeded"], seen
    assert seen.index(("b", "succeeded")) < seen.index(("d", "running"))
    assert not router.announcer.pending, "the sender leaves nothing queued"
    assert (await client.wait(accepted.workflow_id, timeout_s=60)).status == "succeeded"


async def test_failing_handler_fails_task_and_dependents(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    done = await client.run(
        {
            "tasks": [
                {"id": "ok", "capability": "demo.echo", "input": "fine"},
                {"id": "bad", "capability": "demo.fail", "input": "the model said no", "max_attempts": 1},
                {"id": "after", "capability": "demo.echo", "depends_on": ["bad", "ok"]},
                {"id": "later", "capability": "demo.echo", "depends_on": ["after"]},
            ]
        },
        timeout_s=60,
    )
    assert done.status == "failed"
    assert done.tasks["ok"].status == "succeeded"
    bad = done.tasks["bad"]
    assert bad.status == "dead"  # its one attempt failed: parked on {ns}.dead
    assert bad.error is not None
    assert (bad.error.type, bad.error.message) == ("ValueError", "the model said no")
    assert done.tasks["after"].status == "upstream_failed"
    assert done.tasks["later"].status == "upstream_failed"
    assert done.tasks["after"].attempts == 0


async def test_handler_timeout_fails_the_task_and_the_worker_keeps_serving(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    worker = await start_worker(demo, concurrency=2)
    slow = await client.run(
        {
            "tasks": [
                {
                    "id": "s",
                    "capability": "demo.sleep",
                    "input": {"seconds": 30},
                    "timeout_s": 0.5,
                    "max_attempts": 1,
                }
            ]
        },
        timeout_s=60,
    )
    assert slow.status == "failed"
    error = slow.tasks["s"].error
    assert error is not None
    assert error.type == "TimeoutError"
    assert "0.5" in error.message
    after = await client.run({"tasks": [{"id": "e", "capability": "demo.echo", "input": 7}]}, timeout_s=60)
    assert after.tasks["e"].result == 7
    assert worker.in_flight == 0


async def test_sync_handlers_run_off_the_event_loop(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    agent = Agent("threads")
    extra_caps.append("t.thread")
    loop_thread = threading.get_ident()

    @agent.handler("t.thread")
    def which_thread(task: Task) -> bool:
        return threading.get_ident() != loop_thread

    await start_worker(agent)
    done = await client.run({"tasks": [{"id": "x", "capability": "t.thread"}]}, timeout_s=60)
    assert done.tasks["x"].result is True


async def test_idempotent_resubmission_creates_one_workflow(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    agent = Agent("counter")
    extra_caps.append("t.count")
    runs: list[str] = []

    @agent.handler("t.count")
    async def count(task: Task) -> int:
        runs.append(task.task_id)
        return len(runs)

    await start_worker(agent)
    workflow = {
        "tasks": [
            {"id": "one", "capability": "t.count"},
            {"id": "two", "capability": "t.count", "depends_on": ["one"]},
        ]
    }
    first = await client.submit(workflow, message_id="same-message")
    second = await client.submit(workflow, message_id="same-message")
    assert first.workflow_id == second.workflow_id
    done = await client.wait(first.workflow_id, timeout_s=60)
    assert done.status == "succeeded"
    # A resend after completion is answered with the same accepted reply, and the workflow is not rerun.
    third = await client.submit(workflow, message_id="same-message")
    assert third.workflow_id == first.workflow_id
    assert sorted(runs) == ["one", "two"]
    # Same explicit workflow_id with the same body: same workflow; with another body: conflict.
    named = {"workflow_id": "my-flow", **workflow}
    assert (await client.submit(named)).workflow_id == "my-flow"
    assert (await client.submit(named)).workflow_id == "my-flow"
    with pytest.raises(SubmissionRejected) as info:
        await client.submit({"workflow_id": "my-flow", "tasks": [{"id": "other", "capability": "t.count"}]})
    assert info.value.reason == "conflict"
    await client.wait("my-flow", timeout_s=60)
    assert sorted(runs) == ["one", "one", "two", "two"]


async def test_priority_task_jumps_the_queue(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    agent = Agent("prio")
    extra_caps.append("t.prio")
    order: list[str] = []

    @agent.handler("t.prio")
    async def record(task: Task) -> None:
        order.append(task.task_id)

    # No worker runs yet: 50 priority-0 tasks, then one priority-9 task, all queued in the broker.
    low = [{"id": f"low{i}", "capability": "t.prio", "priority": 0} for i in range(50)]
    await client.submit({"tasks": low})
    await client.submit({"tasks": [{"id": "urgent", "capability": "t.prio", "priority": 9}]})
    queue = names.capability_queue(settings.namespace, "t.prio")

    async def queued() -> bool:
        info = await broker.queue_info(queue)
        return info is not None and info.messages == 51

    await eventually(queued, what="51 tasks queued")
    prefetch = 4
    await start_worker(agent, concurrency=prefetch)
    await eventually(lambda: len(order) == 51, what="all tasks run")
    assert "urgent" in order[:prefetch], order[:10]


async def test_many_tasks_spread_and_complete(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    w1 = await start_worker(demo, concurrency=4, agent_id="w1")
    w2 = await start_worker(demo, concurrency=4, agent_id="w2")
    tasks = [{"id": f"t{i}", "capability": "demo.sleep", "input": {"seconds": 0.05}} for i in range(40)]
    done = await client.run({"tasks": tasks}, timeout_s=120)
    assert done.status == "succeeded"
    agents = {outcome.agent for outcome in done.tasks.values()}
    assert agents == {"w1", "w2"}
    assert w1.processed + w2.processed == 40


async def test_tasks_wait_in_their_queue_until_an_agent_comes(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    broker: AmqpConnection,
) -> None:
    accepted = await client.submit(
        {"tasks": [{"id": "early", "capability": "demo.echo", "input": "patience"}]}
    )
    queue = names.capability_queue(settings.namespace, "demo.echo")
    info = await eventually(lambda: broker.queue_info(queue), what="capability queue declared by the router")
    assert info.consumers == 0
    await start_worker(demo)
    done = await client.wait(accepted.workflow_id, timeout_s=60)
    assert done.tasks["early"].result == "patience"


async def test_wait_on_a_workflow_submitted_elsewhere(
    settings: FabricSettings, client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    accepted = await client.submit(
        {"tasks": [{"id": "x", "capability": "demo.sleep", "input": {"seconds": 0.3}}]}
    )
    async with FabricClient(settings) as other:
        done = await other.wait(accepted.workflow_id, timeout_s=60)
        assert done.status == "succeeded"
        # And after it finished: answered from the store.
        again = await other.wait(accepted.workflow_id, timeout_s=60)
        assert again.workflow_id == accepted.workflow_id
    await asyncio.wait_for(client.wait(accepted.workflow_id), 60)
