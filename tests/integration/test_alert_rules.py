"""Threshold alert rules on the real broker: each condition is one alert until it clears, then one
resolved alert, on {ns}.alerts (and the webhooks, through the same AlertPublisher)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import Agent, FabricClient, Task
from fabric.protocol.messages import AlertSeverity, AlertStatus
from fabric.router.service import Router
from fabric.settings import AlertRuleSettings, AlertSettings, FabricSettings
from fabric.store import AgentRecord
from tests.conftest import eventually
from tests.integration.conftest import AlertQueue, StartWorker

pytestmark = pytest.mark.rabbitmq

QUIET = {"error_rate": None, "queue_depth": None, "queue_age_s": None, "no_agent_after_s": None}


@pytest.fixture
def settings(settings: FabricSettings) -> FabricSettings:
    """No circuit breaker in the way: these tests fail tasks on purpose."""
    return settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"breaker_failures": 10_000})}
    )


@pytest.fixture
def rules() -> dict[str, Any]:
    return dict(QUIET)


@pytest.fixture
async def router(settings: FabricSettings, rules: dict[str, Any]) -> AsyncIterator[Router]:
    configured = settings.model_copy(
        update={
            "router": settings.router.model_copy(update={"metrics_interval_s": 0.2}),
            "alerts": AlertSettings(rules=AlertRuleSettings(**rules)),
        }
    )
    async with Router(configured) as r:
        yield r


def fired(queue: AlertQueue, key: str) -> list[Any]:
    return [a for _, a in queue.of(key)]


def resolved(queue: AlertQueue, key: str) -> list[Any]:
    return [a for _, a in queue.of(key, AlertStatus.RESOLVED)]


@pytest.mark.parametrize(
    "rules", [{**QUIET, "error_rate": 0.5, "error_rate_window_s": 30, "error_rate_min_attempts": 4}]
)
async def test_error_rate_fires_once_when_crossed_and_clears_when_it_recovers(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    alert_queue: AlertQueue,
) -> None:
    extra_caps.append("t.rate")
    agent = Agent("rate")

    @agent.handler("t.rate")
    async def judge(task: Task) -> str:
        if task.input == "bad":
            raise ValueError("bad input")
        return "ok"

    await start_worker(agent, concurrency=8)
    key = "capability.error_rate:t.rate"
    bad = await client.run(
        {
            "tasks": [
                {"id": f"b{i}", "capability": "t.rate", "input": "bad", "max_attempts": 1} for i in range(6)
            ]
        },
        timeout_s=60,
    )
    assert bad.status == "failed"
    (alert,) = await eventually(lambda: fired(alert_queue, key), what="the error-rate alert")
    assert alert.kind == "capability.error_rate"
    assert alert.severity is AlertSeverity.WARNING
    assert alert.labels["capability"] == "t.rate"
    assert alert.data["failed"] == 6
    assert "100% of the attempts of t.rate failed" in alert.summary
    # More failures keep the same condition: no second alert.
    await client.run({"tasks": [{"id": "b", "capability": "t.rate", "input": "bad", "max_attempts": 1}]})
    good = await client.run(
        {"tasks": [{"id": f"g{i}", "capability": "t.rate", "input": "good"} for i in range(40)]}, timeout_s=60
    )
    assert good.status == "succeeded"
    (cleared,) = await eventually(lambda: resolved(alert_queue, key), what="the error rate recovering")
    assert cleared.labels == alert.labels
    assert len(fired(alert_queue, key)) == 1, "one condition, one alert"


@pytest.mark.parametrize("rules", [{**QUIET, "queue_depth": 3, "queue_age_s": 1.0, "no_agent_after_s": 0.5}])
async def test_queued_work_without_an_agent_fires_depth_age_and_no_agent_until_an_agent_comes(
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    alert_queue: AlertQueue,
) -> None:
    extra_caps.append("t.orphan")
    await client.submit({"tasks": [{"id": f"t{i}", "capability": "t.orphan"} for i in range(5)]})
    keys = ["queue.depth:t.orphan", "queue.age:t.orphan", "capability.no_agent:t.orphan"]
    await eventually(lambda: all(fired(alert_queue, k) for k in keys), what="three alerts")
    (no_agent,) = fired(alert_queue, "capability.no_agent:t.orphan")
    assert no_agent.severity is AlertSeverity.CRITICAL
    assert "5 tasks of t.orphan wait and no live agent serves it" in no_agent.summary
    (depth,) = fired(alert_queue, "queue.depth:t.orphan")
    assert depth.data == {"depth": 5, "threshold": 3}

    agent = Agent("orphan-taker")

    @agent.handler("t.orphan")
    async def take(task: Task) -> str:
        return "taken"

    await start_worker(agent)
    await eventually(lambda: all(resolved(alert_queue, k) for k in keys), what="all three resolved")
    assert all(len(fired(alert_queue, k)) == 1 for k in keys)


async def test_agent_lost_and_breaker_open_fire_and_resolve(router: Router, alert_queue: AlertQueue) -> None:
    def ghost(**fields: Any) -> AgentRecord:
        return AgentRecord(
            agent_id="ghost@h:1",
            agent="ghost",
            host="h",
            pid=1,
            capabilities=["t.x"],
            concurrency=1,
            interval_s=1.0,
            **fields,
        )

    await router.store.put_agent(ghost(last_seen=time.time() - 60))
    (lost,) = await eventually(lambda: fired(alert_queue, "agent.lost:ghost@h:1"), what="agent lost")
    assert "no heartbeat for" in lost.summary
    # Back, with its breaker open: lost resolves, breaker fires; closed again: it resolves too.
    await router.store.put_agent(ghost(last_seen=time.time() + 3600, breakers={"t.x": "open"}))
    await eventually(lambda: resolved(alert_queue, "agent.lost:ghost@h:1"), what="agent back")
    (breaker,) = await eventually(lambda: fired(alert_queue, "breaker.open:ghost@h:1/t.x"), what="breaker")
    assert breaker.labels == {"source": "router", "agent_id": "ghost@h:1", "capability": "t.x"}
    await router.store.put_agent(ghost(last_seen=time.time() + 3600, breakers={"t.x": "closed"}))
    await eventually(lambda: resolved(alert_queue, "breaker.open:ghost@h:1/t.x"), what="breaker closed")
    # An agent that drained before it went quiet left on purpose: no alert.
    await router.store.put_agent(
        AgentRecord(
            agent_id="gone@h:2",
            agent="gone",
            host="h",
            pid=2,
            capabilities=["t.x"],
            concurrency=1,
            interval_s=1.0,
            health="draining",
            last_seen=time.time() - 60,
        )
    )
    await router.check_alert_rules()
    assert not router.alerts.firing("agent.lost:gone@h:2")
