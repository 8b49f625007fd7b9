"""Agent health across real processes: the router's stall watchdog marks an agent that heartbeats but
does not consume, although its queue has work, ``unhealthy`` and alerts; an agent busy at its
concurrency limit stays healthy; the stalled one is healthy again (alert resolved) once it consumes."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fabric import FabricClient
from fabric.settings import FabricSettings
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e, pytest.mark.fault]

AGENTS = textwrap.dedent(
    """
    import asyncio

    from fabric import Agent, Task

    idle = Agent("idle")

    @idle.handler("t.stall")
    async def echo(task: Task) -> object:
        return task.input

    busy = Agent("busy")

    @busy.handler("t.busy")
    async def slow(task: Task) -> float:
        await asyncio.sleep(float(task.input))
        return float(task.input)
    """
)

STALL_AFTER_S = 2.0
#: The stalled worker's own watchdog notices its lost consumer only this late: until then it
#: heartbeats without consuming, which the router must catch first.
SELF_WATCHDOG_S = 20


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _quiet_s(agent: dict[str, Any], capability: str) -> float:
    """Seconds the agent went without a task of ``capability``, up to its last heartbeat."""
    state = agent["consumers"][capability]
    since = max(t for t in (state["last_delivery_at"], state["subscribed_at"]) if t is not None)
    return float(agent["last_seen"] - since)


async def test_stalled_agent_is_unhealthy_and_alerted_busy_one_is_not_and_it_recovers(
    fleet: Fleet,
    settings: FabricSettings,
    broker: AmqpConnection,
    tmp_path: Path,
    extra_caps: list[str],
) -> None:
    extra_caps.extend(["t.stall", "t.busy"])
    (tmp_path / "health_agents.py").write_text(AGENTS)
    fleet.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    fleet.env["FABRIC_ROUTER__STALL_AFTER_S"] = str(STALL_AFTER_S)
    fleet.env["FABRIC_ROUTER__STALL_CHECK_INTERVAL_S"] = "0.3"
    fleet.env["FABRIC_WORKER__DRAIN_TIMEOUT_S"] = "1"  # the busy worker's long task is not waited for

    alerts: list[dict[str, Any]] = []

    async def on_alert(delivery: Delivery) -> None:
        alerts.append({"routing_key": delivery.routing_key, **json.loads(delivery.body)})
        await delivery.ack()

    await fleet.router()
    listener = await broker.reply_queue(on_alert, prefetch=100)
    await listener.bind(names.alerts_exchange(settings.namespace), "alert.#")
    await fleet.worker("busy", "health_agents:busy", concurrency=1, queue="t.busy")
    # The stuck worker's two ways of subscribing again are slow: aio-pika's consumer recovery
    # (`reconnect_interval` in the broker URL) and fabric's own watchdog. Until one of them acts, it
    # heartbeats without consuming, which the router must notice first.
    stuck_env = {
        "FABRIC_AMQP_URL": _with_query(settings.amqp_url.get_secret_value(), "reconnect_interval=600"),
        "FABRIC_WORKER__WATCHDOG_INTERVAL_S": str(SELF_WATCHDOG_S),
    }
    saved = dict(fleet.env)
    fleet.env.update(stuck_env)
    await fleet.worker("stuck", "health_agents:idle", concurrency=2, queue="t.stall")
    fleet.env = saved

    async with FabricClient(settings, reply_timeout_s=60) as client:

        async def agents() -> dict[str, dict[str, Any]]:
            return {a["agent_id"]: a for a in await client.query("agents")}

        # The broker drops the stuck worker's consumer: its queue is deleted (`rabbitmqctl
        # delete_queue`). Once the worker has seen that (and aio-pika's immediate recovery attempt
        # failed on the missing queue), the queue is declared again, as a redeploy would.
        stall_queue = names.capability_queue(settings.namespace, "t.stall")
        await broker.delete(spec.Topology(queues=(spec.QueueSpec(stall_queue),)))

        async def consumer_gone() -> bool:
            stuck = (await agents()).get("stuck", {})
            return stuck.get("consumers", {}).get("t.stall", {}).get("consuming") is False

        await eventually(consumer_gone, timeout=10, what="the stuck worker's heartbeat: not consuming")
        await broker.declare(spec.capability(settings.namespace, "t.stall"))

        # The busy worker takes one long task (its only slot); two more wait in its queue.
        busy_wf = await client.submit(
            {"tasks": [{"id": f"slow{i}", "capability": "t.busy", "input": 12} for i in range(3)]}
        )
        stall_wf = await client.submit(
            {"tasks": [{"id": f"echo{i}", "capability": "t.stall", "input": i} for i in range(3)]}
        )

        async def stuck_unhealthy() -> dict[str, dict[str, Any]] | None:
            found = await agents()
            return found if found.get("stuck", {}).get("state") == "unhealthy" else None

        found = await eventually(
            stuck_unhealthy, timeout=SELF_WATCHDOG_S - 5, what="the stuck agent unhealthy"
        )
        stuck = found["stuck"]
        assert "t.stall" in stuck["reason"]
        assert "not consuming t.stall" in stuck["reason"], "its heartbeat says its consumer is gone"
        assert stuck["unhealthy"]["t.stall"]["reason"] == stuck["reason"]
        assert stuck["consumers"]["t.stall"]["consuming"] is False
        info = await broker.queue_info(stall_queue)
        assert info is not None
        assert info.messages == 3, "the work really waits while it is marked"
        answers = await client.why(stall_wf.workflow_id)
        assert {a["reason"] for a in answers} == {"queued"}
        assert all(a["unhealthy_agents"] == ["stuck"] for a in answers), answers

        firing = await eventually(
            lambda: [a for a in alerts if a["status"] == "firing"], timeout=10, what="the stall alert"
        )
        assert len(firing) == 1
        assert firing[0]["routing_key"] == "alert.warning.agent.stalled"
        assert firing[0]["labels"] == {"source": "router", "agent_id": "stuck", "capability": "t.stall"}

        # The busy worker also got no task for longer than stall_after_s while its queue had work, but
        # it is at its concurrency limit: healthy, and never alerted.
        async def busy_quiet_long_enough() -> dict[str, Any] | None:
            busy = (await agents())["busy"]
            return busy if _quiet_s(busy, "t.busy") > STALL_AFTER_S + 1 else None

        busy = await eventually(
            busy_quiet_long_enough, timeout=10, what="the busy agent quiet past stall_after_s"
        )
        assert busy["in_flight"] == busy["concurrency"] == 1
        assert busy["free_since"] is None
        busy_info = await broker.queue_info(names.capability_queue(settings.namespace, "t.busy"))
        assert busy_info is not None
        assert busy_info.messages == 2
        assert busy["state"] == "alive"
        assert busy["unhealthy"] == {}
        assert not [a for a in alerts if a["labels"].get("agent_id") == "busy"]

        table = run_cli({**fleet.env, "COLUMNS": "400"}, "agents")
        assert table.returncode == 0, table.stderr
        assert "unhealthy" in table.stdout
        assert "t.stall (10)" in table.stdout, "the score next to the capability"

        # The worker's own watchdog subscribes again; it consumes the waiting tasks and is healthy.
        done = await client.wait(stall_wf.workflow_id, timeout_s=SELF_WATCHDOG_S + 30)
        assert done.status == "succeeded"

        async def healthy_again() -> bool:
            return bool((await agents())["stuck"]["state"] == "alive")

        await eventually(healthy_again, timeout=15, what="the stuck agent healthy again")
        resolved = await eventually(
            lambda: [a for a in alerts if a["status"] == "resolved"], timeout=10, what="the resolved alert"
        )
        assert resolved[0]["key"] == firing[0]["key"]
        assert "consumes t.stall again" in resolved[0]["summary"]
        assert len([a for a in alerts if a["status"] == "firing"]) == 1, "one alert per stall"
        status = await client.status(busy_wf.workflow_id)
        assert status["tasks"]["slow0"]["agent"] == "busy"
