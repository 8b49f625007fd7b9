"""A worker that stops cleanly says so: its last heartbeat says ``stopped``, the router shows it
``stopped`` (not ``lost``) everywhere it shows agents and raises no ``agent.lost``; a lost agent that
reports it stopped resolves its alert; stopped and lost agents leave the registry after
``router.agent_retention_s``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from fabric import Agent, Task
from fabric.protocol import codec
from fabric.protocol.messages import AlertStatus, Heartbeat
from fabric.router.http.views import build_stats
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.store import AgentRecord
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.integration.conftest import AlertQueue, StartWorker

pytestmark = pytest.mark.rabbitmq

CAP = "t.stop"


@pytest.fixture
def retention_s() -> float:
    return 3600.0


@pytest.fixture
async def router(settings: FabricSettings, retention_s: float) -> AsyncIterator[Router]:
    configured = settings.model_copy(
        update={
            "router": settings.router.model_copy(
                update={"metrics_interval_s": 0.2, "agent_retention_s": retention_s}
            )
        }
    )
    async with Router(configured) as r:
        yield r


def _agent() -> Agent:
    agent = Agent("stopper")

    @agent.handler(CAP)
    async def echo(task: Task) -> object:
        return task.input

    return agent


def _ghost(agent_id: str, *, last_seen: float, health: str = "ok") -> AgentRecord:
    """An agent record as heartbeats leave it (interval 0.5 s: lost 2.5 s after its last one)."""
    return AgentRecord(
        agent_id=agent_id,
        agent="ghost",
        host="h",
        pid=1,
        capabilities=[CAP],
        concurrency=1,
        interval_s=0.5,
        health=health,
        last_seen=last_seen,
    )


async def _states(router: Router) -> dict[str, str]:
    return {a["agent_id"]: a["state"] for a in await router.agents()}


async def test_a_drained_worker_is_stopped_not_lost_and_not_alerted(
    router: Router, start_worker: StartWorker, alert_queue: AlertQueue, extra_caps: list[str]
) -> None:
    extra_caps.append(CAP)
    worker = await start_worker(_agent(), agent_id="clean-1")
    await eventually(lambda: _states(router), what="the worker's first heartbeat")
    assert (await _states(router))["clean-1"] == "alive"

    await worker.drain()

    async def stopped() -> bool:
        return (await _states(router)).get("clean-1") == "stopped"

    await eventually(stopped, timeout=10, what="the worker shown stopped")
    # A crashed agent beside it, silent as long: the rules, which do run, call only that one lost.
    await router.store.put_agent(_ghost("crashed-1", last_seen=time.time() - 60))
    await eventually(lambda: alert_queue.of("agent.lost:crashed-1"), timeout=10, what="the crash alerted")

    async def past_lost_threshold() -> bool:
        (record,) = [a for a in await router.store.list_agents() if a.agent_id == "clean-1"]
        await router.check_alert_rules()
        return time.time() - record.last_seen > 3 * record.interval_s + 1

    await eventually(past_lost_threshold, timeout=10, what="three heartbeat intervals of silence")
    assert (await _states(router))["clean-1"] == "stopped"
    assert not alert_queue.of("agent.lost:clean-1")
    assert not router.alerts.firing("agent.lost:clean-1")

    stats = await build_stats(router, router.store)
    assert stats.agents.model_dump() == {"alive": 0, "unhealthy": 0, "lost": 1, "stopped": 1}
    await router.refresh_gauges()
    exposition = router.metrics.render()
    assert 'fabric_agents{state="stopped"} 1.0' in exposition
    assert 'fabric_agents{state="lost"} 1.0' in exposition


async def test_a_lost_agent_that_reports_it_stopped_resolves_its_alert(
    router: Router, broker: AmqpConnection, alert_queue: AlertQueue
) -> None:
    await router.store.put_agent(_ghost("late-1", last_seen=time.time() - 60))
    await eventually(lambda: alert_queue.of("agent.lost:late-1"), timeout=10, what="the lost alert")
    # Its network comes back in time for a clean stop: its final heartbeat arrives.
    beat = Heartbeat(
        agent_id="late-1",
        agent="ghost",
        host="h",
        pid=1,
        capabilities=[CAP],
        concurrency=1,
        in_flight=0,
        health="stopped",
        interval_s=0.5,
        at=time.time(),
    )
    await broker.publish(
        names.heartbeats_exchange(router.ns),
        "",
        codec.encode(beat.model_dump(mode="python")),
        persistent=False,
        mandatory=False,
    )
    (resolved,) = await eventually(
        lambda: alert_queue.of("agent.lost:late-1", AlertStatus.RESOLVED), timeout=10, what="resolved"
    )
    assert resolved[1].summary == "resolved: agent late-1 reported that it stopped"
    assert (await _states(router))["late-1"] == "stopped"


@pytest.mark.parametrize("retention_s", [2.0])
async def test_stopped_and_lost_agents_are_pruned_after_the_retention(
    router: Router, start_worker: StartWorker, alert_queue: AlertQueue, extra_caps: list[str]
) -> None:
    extra_caps.append(CAP)
    now = time.time()
    # Seen just now, but gone already: they stay listed for the retention, then leave.
    await router.store.put_agent(_ghost("lost-1", last_seen=now - 1.0))
    await router.store.put_agent(_ghost("stopped-1", last_seen=now, health="stopped"))
    live = await start_worker(_agent(), agent_id="live-1")
    listed = await eventually(lambda: _states(router), what="the agents listed")
    assert {"lost-1", "stopped-1"} <= set(listed)

    async def pruned() -> dict[str, str] | None:
        states = await _states(router)
        return states if "lost-1" not in states and "stopped-1" not in states else None

    states = await eventually(pruned, timeout=20, what="the lost and the stopped agent pruned")
    assert states == {"live-1": "alive"}, "a live agent stays, however long it has run"

    # A lost alert resolves when its agent leaves the registry (nothing more to watch).
    await eventually(
        lambda: not router.alerts.firing("agent.lost:lost-1"), timeout=10, what="no lost alert firing"
    )
    await live.drain()

    async def live_pruned() -> bool:
        return "live-1" not in await _states(router)

    await eventually(live_pruned, timeout=20, what="the stopped worker pruned in turn")
