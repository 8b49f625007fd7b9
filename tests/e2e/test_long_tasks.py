"""A worker killed (-9) while it runs a long task whose message it already acked (a leased task):
the router notices the lease lapse and runs the task again, once, on another worker; at the attempt
limit it parks the task as ``worker_lost``. On a node whose consumer_timeout (2 s) the task outlives."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import FabricClient
from fabric.protocol import headers
from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.e2e.conftest import Fleet

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.fault]

#: Lease settings for every process: lease after 0.5 s, lapse after 3 s unrenewed, checked every 0.2 s.
LEASES = {
    "FABRIC_WORKER__LEASE_AFTER_S": "0.5",
    "FABRIC_WORKER__LEASE_TTL_S": "3",
    "FABRIC_ROUTER__LEASE_CHECK_INTERVAL_S": "0.2",
}


@pytest.fixture
def amqp_url(short_timeout_amqp_url: str) -> str:
    return short_timeout_amqp_url


async def leased_on(client: FabricClient, workflow_id: str, agent: str) -> dict[str, Any] | None:
    """The long task's status once it runs leased on ``agent``."""
    task = (await client.status(workflow_id))["tasks"]["long"]
    if task["status"] == "running" and task["agent"] == agent and task["lease_s"] == 3.0:
        return dict(task)
    return None


async def test_killed_worker_long_task_runs_again_once_elsewhere(
    fleet: Fleet, settings: FabricSettings
) -> None:
    fleet.env.update(LEASES)
    await fleet.router()
    victim = await fleet.worker("victim", queue="demo.sleep")
    async with FabricClient(settings, reply_timeout_s=60) as client:
        workflow = {
            "workflow_id": "wf-kill",
            "tasks": [{"id": "long", "capability": "demo.sleep", "input": 5}],
        }
        await client.submit(workflow)
        await eventually(
            lambda: leased_on(client, "wf-kill", "victim"), what="the long task leased on victim"
        )
        victim.kill()
        victim.wait()
        await fleet.worker("rescuer", queue="demo.sleep")
        done = await client.wait("wf-kill", timeout_s=60)
        status = await client.status("wf-kill")

    long = done.tasks["long"]
    assert done.status == "succeeded"
    assert (long.result, long.attempts, long.agent) == (5, 2, "rescuer")
    lost = [e for e in status["tasks"]["long"]["history"] if e["error"]["type"] == "WorkerLost"]
    assert [(e["attempt"], e["agent"], e.get("lapsed")) for e in lost] == [(1, "victim", True)]
    assert len(status["tasks"]["long"]["history"]) == 1, "one lost attempt, one completion, nothing else"


async def test_leased_task_whose_worker_keeps_dying_is_parked_worker_lost(
    fleet: Fleet, settings: FabricSettings, broker: AmqpConnection
) -> None:
    fleet.env.update(LEASES)
    await fleet.router()
    victim = await fleet.worker("victim", queue="demo.sleep")
    async with FabricClient(settings, reply_timeout_s=60) as client:
        task = {"id": "long", "capability": "demo.sleep", "input": 30, "max_attempts": 1}
        await client.submit({"workflow_id": "wf-park", "tasks": [task]})
        await eventually(
            lambda: leased_on(client, "wf-park", "victim"), what="the long task leased on victim"
        )
        victim.kill()
        done = await client.wait("wf-park", timeout_s=60)

    long = done.tasks["long"]
    assert done.status == "failed"
    assert long.status == "dead"
    assert long.error is not None
    assert long.error.type == "WorkerLost"
    assert long.attempts == 1

    parked: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        parked.append(delivery)
        await delivery.ack()

    await broker.consume(names.dead_queue(settings.namespace), collect, prefetch=10)
    await eventually(lambda: parked, what="the parked task")
    assert headers.get_str(parked[0].headers, headers.DEAD_REASON) == "worker_lost"
    assert headers.get_str(parked[0].headers, headers.TASK_ID) == "long"
    assert headers.get_int(parked[0].headers, headers.ATTEMPT, 0) == 1


async def test_router_restarted_into_an_idle_fabric_still_lapses_the_lease(
    fleet: Fleet, settings: FabricSettings
) -> None:
    """Router and worker both die while a leased task runs; the new router receives no delivery that
    would make it the active one, yet it still notices the lapsed lease."""
    fleet.env.update(LEASES)
    router = await fleet.router("router-1")
    victim = await fleet.worker("victim", queue="demo.sleep")
    async with FabricClient(settings, reply_timeout_s=60) as client:
        workflow = {
            "workflow_id": "wf-idle",
            "tasks": [{"id": "long", "capability": "demo.sleep", "input": 3}],
        }
        await client.submit(workflow)
        await eventually(
            lambda: leased_on(client, "wf-idle", "victim"), what="the long task leased on victim"
        )
        victim.kill()
        router.kill()
        victim.wait()
        router.wait()
        await fleet.router("router-2")
        await fleet.worker("rescuer", queue="demo.sleep")
        done = await client.wait("wf-idle", timeout_s=60)

    assert done.status == "succeeded"
    assert (done.tasks["long"].attempts, done.tasks["long"].agent) == (2, "rescuer")


async def test_leased_task_escalated_when_its_worker_dies_runs_again_when_resumed(
    fleet: Fleet, settings: FabricSettings
) -> None:
    """The lease of the last attempt lapses and the task escalates; resumed, it counts from attempt 1
    again, and that attempt (same number as the one given up) is the task's, not a stale one."""
    fleet.env.update(LEASES)
    await fleet.router()
    victim = await fleet.worker("victim", queue="demo.sleep")
    async with FabricClient(settings, reply_timeout_s=60) as client:
        task = {
            "id": "long",
            "capability": "demo.sleep",
            "input": 30,
            "max_attempts": 1,
            "on_exhausted": "escalate",
        }
        await client.submit({"workflow_id": "wf-resume", "tasks": [task]})
        await eventually(
            lambda: leased_on(client, "wf-resume", "victim"), what="the long task leased on victim"
        )
        victim.kill()
        victim.wait()

        async def escalated() -> bool:
            return bool((await client.status("wf-resume"))["tasks"]["long"]["status"] == "escalated")

        await eventually(escalated, timeout=30, what="the task escalated by its lapsed lease")
        await fleet.worker("rescuer", queue="demo.sleep")
        await client.resume("wf-resume", "long", input=1)

        async def finished() -> dict[str, Any] | None:
            status = await client.status("wf-resume")
            return dict(status) if status["status"] != "running" else None

        status = await eventually(finished, timeout=30, what="the resumed task to finish")
        done = await client.wait("wf-resume", timeout_s=10)

    long = done.tasks["long"]
    assert (done.status, long.status, long.result) == ("succeeded", "succeeded", 1)
    assert (long.attempts, long.agent) == (1, "rescuer")
    assert [(e["attempt"], e["error"]["type"]) for e in status["tasks"]["long"]["history"]] == [
        (1, "WorkerLost"),
        (1, "Resumed"),
    ]
