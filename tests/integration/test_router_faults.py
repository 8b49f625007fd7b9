"""Router edge cases found in review: counting, large fan-outs, values that cannot travel, drifted queues."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fabric import FabricClient, ProtocolError
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.store.base import TaskRecord
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.contract.test_store import task, workflow
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def test_upstream_failed_task_is_counted_once(
    client: FabricClient, router: Router, start_worker: StartWorker
) -> None:
    """A fails, then B succeeds: C (on A and B) must not be counted twice, ending the workflow early."""
    await start_worker(demo, concurrency=4)
    done = await client.run(
        {
            "tasks": [
                {"id": "a", "capability": "demo.fail", "input": "no", "max_attempts": 1},
                {"id": "b", "capability": "demo.sleep", "input": {"seconds": 0.5}},
                {"id": "c", "capability": "demo.echo", "depends_on": ["a", "b"]},
                {"id": "d", "capability": "demo.sleep", "input": {"seconds": 1.5}},
            ]
        },
        timeout_s=60,
    )
    assert done.status == "failed"
    assert done.tasks["d"].status == "succeeded", "the workflow must not finish while d still runs"
    assert done.tasks["b"].status == "succeeded"
    assert done.tasks["c"].status == "upstream_failed"
    # Announced exactly once (the counter moves just after the document is published).
    await eventually(lambda: router.stats["completed"] >= 1, what="completion counted")
    assert router.stats["completed"] == 1


async def test_large_fan_out_to_a_new_capability(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    extra_caps.append("t.wide")
    tasks = [{"id": f"t{i}", "capability": "t.wide"} for i in range(2500)]
    accepted = await client.submit({"tasks": tasks})
    assert accepted.tasks == 2500
    info = await broker.queue_info(names.capability_queue(settings.namespace, "t.wide"))
    assert info is not None
    assert info.messages == 2500
    assert await router._check_broker() is None
    assert await router._check_consumers() is None


async def test_sdk_refuses_a_number_msgpack_cannot_carry(client: FabricClient, router: Router) -> None:
    # The SDK sends msgpack, which cannot encode it: a clear error before anything is sent.
    # (A JSON client gets the router's `rejected` answer: the next test.)
    with pytest.raises(ProtocolError, match="msgpack"):
        await client.submit({"tasks": [{"id": "a", "capability": "demo.echo", "input": 2**70}]})
    assert await router.store.list_workflows() == []


async def test_json_client_big_number_gets_a_rejection(settings: FabricSettings, router: Router) -> None:
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange(names.submit_exchange(settings.namespace))
        body = json.dumps({"tasks": [{"id": "a", "capability": "demo.echo", "input": 2**70}]}).encode()
        await exchange.publish(
            aio_pika.Message(
                body, content_type="application/json", reply_to=replies.name, message_id="big-int"
            ),
            routing_key="workflow",
        )
        message = await eventually(lambda: replies.get(fail=False), what="a reply")
        await message.ack()
        reply = json.loads(message.body)
    finally:
        await connection.close()
    assert reply["kind"] == "rejected"
    assert reply["reason"] == "invalid"
    assert await router.store.list_workflows() == []


async def test_bytes_keys_in_results_reach_a_json_submitter(
    settings: FabricSettings, router: Router, start_worker: StartWorker, client: FabricClient
) -> None:
    from fabric import Agent, Task

    agent = Agent("bytes")

    @agent.handler("demo.echo")
    async def bytes_key(task: Task) -> dict[bytes, int]:
        return {b"k": 1}

    await start_worker(agent)
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange(names.submit_exchange(settings.namespace))
        body = json.dumps({"tasks": [{"id": "a", "capability": "demo.echo"}]}).encode()
        await exchange.publish(
            aio_pika.Message(
                body, content_type="application/json", reply_to=replies.name, message_id="bytes-key"
            ),
            routing_key="workflow",
        )
        docs: list[dict[str, object]] = []

        async def completed() -> bool:
            message = await replies.get(fail=False)
            if message is not None:
                await message.ack()
                docs.append(json.loads(message.body))
            return any(d["kind"] == "completed" for d in docs)

        await eventually(completed, what="the completed document")
    finally:
        await connection.close()
    done = next(d for d in docs if d["kind"] == "completed")
    assert done["tasks"]["a"]["result"] == {"k": 1}  # type: ignore[index]


async def test_drifted_capability_queue_fails_its_tasks_with_the_reason(
    settings: FabricSettings, router: Router, client: FabricClient, broker: AmqpConnection
) -> None:
    queue = names.capability_queue(settings.namespace, "demo.echo")
    await broker.declare(spec.Topology(queues=(spec.QueueSpec(queue),)))  # no x-max-priority
    done = await client.run(
        {
            "tasks": [
                {"id": "a", "capability": "demo.echo"},
                {"id": "b", "capability": "demo.echo", "depends_on": ["a"]},
            ]
        },
        timeout_s=60,
    )
    assert done.status == "failed"
    error = done.tasks["a"].error
    assert error is not None
    assert error.type == "TopologyMismatch"
    assert "x-max-priority" in error.message
    assert done.tasks["b"].status == "upstream_failed"


async def test_resubmission_from_a_new_client_gets_the_result(
    settings: FabricSettings, router: Router, start_worker: StartWorker
) -> None:
    workflow = {
        "workflow_id": "resubmit-1",
        "tasks": [{"id": "s", "capability": "demo.sleep", "input": {"seconds": 1}}],
    }
    async with FabricClient(settings) as first:
        await first.submit(workflow)
    await start_worker(demo)
    async with FabricClient(settings, reply_timeout_s=30) as second:
        done = await second.run(workflow, timeout_s=30)
    assert done.status == "succeeded"


async def test_wait_for_unknown_workflow_twice(client: FabricClient, router: Router) -> None:
    from fabric import WorkflowNotFound

    for _ in range(2):
        with pytest.raises(WorkflowNotFound):
            await client.wait("never-submitted", timeout_s=10)


async def test_a_recovery_pass_ends_while_new_tasks_keep_coming(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load some task has always just been stored and not yet confirmed. A recovery pass
    leaves the ones stored after it began to the normal path and ends (it would otherwise chase
    admissions for as long as the load lasts, its set of attempted keys growing with each), while a
    task left undispatched before it began is published."""
    store = router.store
    await store.insert_workflow(workflow("wf-stranded", task_count=1), [task("a", "wf-stranded")])
    undispatched = store.undispatched
    admitted = 0

    async def with_a_new_admission(limit: int = 1000) -> list[TaskRecord]:
        nonlocal admitted
        admitted += 1
        now = time.time()
        fresh = f"wf-new-{admitted}"
        await store.insert_workflow(
            workflow(fresh, created_at=now, task_count=1), [task("a", fresh, created_at=now)]
        )
        return await undispatched(limit)

    monkeypatch.setattr(store, "undispatched", with_a_new_admission)
    await asyncio.wait_for(router._recover(), timeout=60)  # a guard against a pass that never ends

    assert (await store.get_tasks("wf-stranded"))["a"].dispatched
    assert admitted >= 2  # new tasks came in during the pass


async def test_a_workflow_failed_undeliverable_at_submission_is_accepted_before_it_completes(
    settings: FabricSettings, router: Router, broker: AmqpConnection
) -> None:
    """Its only ready task cannot be delivered (the capability queue drifted), so the workflow ends at
    once: the submitter still gets the ``accepted`` reply first, then the ``completed`` document."""
    import aio_pika

    queue = names.capability_queue(settings.namespace, "demo.echo")
    await broker.declare(spec.Topology(queues=(spec.QueueSpec(queue),)))  # no x-max-priority
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange(names.submit_exchange(settings.namespace))
        body = json.dumps({"tasks": [{"id": "a", "capability": "demo.echo"}]}).encode()
        await exchange.publish(
            aio_pika.Message(
                body, content_type="application/json", reply_to=replies.name, message_id="drifted-1"
            ),
            routing_key="workflow",
        )
        kinds: list[str] = []

        async def completed() -> bool:
            message = await replies.get(fail=False)
            if message is not None:
                await message.ack()
                kinds.append(json.loads(message.body)["kind"])
            return "completed" in kinds

        await eventually(completed, what="the completed document")
    finally:
        await connection.close()
    assert kinds == ["accepted", "completed"]
