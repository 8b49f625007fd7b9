"""The router's stall watchdog against the real broker and store, driven pass by pass: one alert per
stall, the mark in the store, a restarted router that fires it once more and resolves it."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.store.base import AgentRecord
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually

pytestmark = pytest.mark.rabbitmq

CAP = "t.quiet"


def _agent(now: float, *, last_delivery_at: float | None = None) -> AgentRecord:
    """An agent whose heartbeats say: free for 10 minutes, subscribed for 10 minutes, nothing delivered."""
    return AgentRecord(
        agent_id="quiet-1",
        agent="quiet",
        host="h",
        pid=1,
        capabilities=[CAP],
        concurrency=4,
        interval_s=5.0,
        free_since=now - 600,
        consumers={
            CAP: {
                "consuming": True,
                "subscribed_at": now - 600,
                "last_delivery_at": last_delivery_at,
                "deliveries": 0 if last_delivery_at is None else 1,
                "score": 10,
            }
        },
        first_seen=now - 600,
        last_seen=now,
    )


async def test_one_alert_per_stall_kept_across_a_router_restart_and_resolved(
    settings: FabricSettings, broker: AmqpConnection, extra_caps: list[str]
) -> None:
    extra_caps.append(CAP)
    alerts: list[dict[str, Any]] = []

    async def on_alert(delivery: Delivery) -> None:
        alerts.append(json.loads(delivery.body))
        await delivery.ack()

    def firing() -> list[dict[str, Any]]:
        return [a for a in alerts if a["status"] == "firing"]

    await broker.declare(spec.build(settings.namespace, [CAP]))
    listener = await broker.reply_queue(on_alert, prefetch=100)
    await listener.bind(names.alerts_exchange(settings.namespace), "alert.#")
    for i in range(3):
        await broker.publish(names.tasks_exchange(settings.namespace), CAP, b"\x80", message_id=f"m{i}")
    stall_after = settings.router.stall_after_s
    now = time.time()

    async with Router(settings) as router:
        await router.store.put_agent(_agent(now))
        await router.check_stalls(now=now)  # the queue's work is seen for the first time
        assert not (await router.store.list_agents())[0].unhealthy, "work waiting for 0 s is no stall"
        later = now + stall_after + 1
        await router.store.put_agent(_agent(later))
        await router.check_stalls(now=later)
        (record,) = await router.store.list_agents()
        assert "no task delivered" in record.unhealthy[CAP]["reason"]
        await router.check_stalls(now=later + 1)
        await eventually(firing, timeout=10, what="the stall alert")
        await router.alerts.flush()
        assert len(firing()) == 1, "one alert per stall, however many passes see it"
        assert firing()[0]["key"] == f"agent.stalled:quiet-1/{CAP}"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as http:
            listed = (await http.get("/api/v1/agents", params={"state": "unhealthy"})).json()["items"]
            assert [a["agent_id"] for a in listed] == ["quiet-1"]
            assert "no task delivered" in listed[0]["reason"]
            assert listed[0]["consumers"][CAP]["score"] == 10
            stats = (await http.get("/api/v1/stats")).json()
            assert stats["agents"] == {"alive": 0, "unhealthy": 1, "lost": 0, "stopped": 0}
        # The dashboard's history counts a stalled agent among the living: it heartbeats, it is not lost.
        sample = await router.take_sample()
        assert (sample.data["agents_alive"], sample.data["agents_lost"]) == (1, 0)

    # A new router (a restart) takes the mark from the store and fires it once more: its alert
    # publisher's memory is new, and the stall can only be resolved while it fires.
    async with Router(settings) as router:
        (record,) = await router.store.list_agents()
        assert CAP in record.unhealthy
        await router.check_stalls(now=later + 2)
        await eventually(
            lambda: len(firing()) == 2, timeout=10, what="the stall fired again after the restart"
        )
        # The agent takes a task (its heartbeat moves last_delivery_at): healthy, the alert resolved.
        await router.store.put_agent(_agent(later + 3, last_delivery_at=later + 3))
        await router.check_stalls(now=later + 3)
        (record,) = await router.store.list_agents()
        assert record.unhealthy == {}
        resolved = await eventually(
            lambda: [a for a in alerts if a["status"] == "resolved"], timeout=10, what="the resolved alert"
        )
        assert resolved[0]["key"] == f"agent.stalled:quiet-1/{CAP}"
        assert resolved[0]["summary"] == f"agent quiet-1: it consumes {CAP} again"
        view = {a["agent_id"]: a for a in await router.rpc.call("agents", {})}
        assert view["quiet-1"]["state"] == "alive"
