"""One census of the agents (fabric.router.agents.Census), judged once and read by the gauges, the
threshold rules, the samples, ``why``, the stall watchdog and the ``agents`` views."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.router.agents import Census, agent_view, stall_key
from fabric.router.watchdog import AgentStatus
from fabric.store.base import AgentRecord

NOW = 10_000.0


def agent(
    agent_id: str,
    *,
    capabilities: tuple[str, ...] = ("cap",),
    health: str = "ok",
    last_seen: float = NOW,
    breakers: dict[str, str] | None = None,
    unhealthy: dict[str, Any] | None = None,
    free_since: float | None = NOW - 10,
    in_flight: int = 0,
) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        agent="demo",
        host="h",
        pid=1,
        capabilities=list(capabilities),
        concurrency=4,
        in_flight=in_flight,
        health=health,
        interval_s=5.0,
        last_seen=last_seen,
        breakers=breakers or {},
        unhealthy=unhealthy or {},
        free_since=free_since,
    )


ALIVE = agent("alive", capabilities=("cap", "other"), in_flight=2)
OPEN = agent("open", breakers={"cap": "open"})
BUSY = agent("busy", free_since=None, in_flight=4)
STALLED = agent("stalled", unhealthy={"cap": {"reason": "not consuming cap"}})
LOST = agent("lost", last_seen=NOW - 60)
STOPPED = agent("stopped", health="stopped", capabilities=("gone",))
DRAINING = agent("draining", health="draining", capabilities=("other",))
EVERYONE = [ALIVE, OPEN, BUSY, STALLED, LOST, STOPPED, DRAINING]


@pytest.mark.parametrize(
    ("record", "state"),
    [
        (ALIVE, AgentStatus.ALIVE),
        (OPEN, AgentStatus.ALIVE),
        (STALLED, AgentStatus.UNHEALTHY),
        (LOST, AgentStatus.LOST),
        (STOPPED, AgentStatus.STOPPED),
        (DRAINING, AgentStatus.ALIVE),
    ],
)
def test_each_agent_is_judged_once_by_the_watchdog(record: AgentRecord, state: AgentStatus) -> None:
    assert list(Census.take([record], NOW)) == [(record, state)]


def test_counts_cover_every_state() -> None:
    counts = Census.take(EVERYONE, NOW).counts()
    assert counts == {
        AgentStatus.ALIVE: 4,
        AgentStatus.UNHEALTHY: 1,
        AgentStatus.LOST: 1,
        AgentStatus.STOPPED: 1,
    }
    assert Census.take([], NOW).counts() == dict.fromkeys(AgentStatus, 0)


def test_live_agents_are_alive_or_unhealthy() -> None:
    live = {a.agent_id for a in Census.take(EVERYONE, NOW).live()}
    assert live == {"alive", "open", "busy", "stalled", "draining"}


def test_serving_by_capability_counts_live_agents_and_breakers_not_closed() -> None:
    alive_by, open_by = Census.take(EVERYONE, NOW).serving_by_capability()
    assert alive_by == {"cap": 4, "other": 2}
    assert open_by == {"cap": 1}


def test_capabilities_are_every_agents_seen() -> None:
    assert Census.take(EVERYONE, NOW).capabilities() == {"cap", "other", "gone"}


def test_stall_candidates_are_served_by_a_live_agent_with_room_and_a_closed_breaker() -> None:
    assert Census.take(EVERYONE, NOW).stall_candidates() == ["cap", "other"]
    assert Census.take([OPEN, BUSY, LOST], NOW).stall_candidates() == []


def test_rule_states_carry_the_judged_state() -> None:
    states = {s.agent_id: s for s in Census.take(EVERYONE, NOW).rule_states()}
    assert (states["lost"].lost, states["lost"].stopped) == (True, False)
    assert (states["stopped"].lost, states["stopped"].stopped) == (False, True)
    assert states["draining"].draining
    assert states["open"].breakers == {"cap": "open"}
    assert states["alive"].capabilities == ("cap", "other")
    assert all(s.live for k, s in states.items() if k not in ("lost", "stopped"))


def test_views_show_state_reason_and_silence() -> None:
    views = {v["agent_id"]: v for v in Census.take(EVERYONE, NOW + 0.04).views()}
    assert views["stalled"]["state"] == "unhealthy"
    assert views["stalled"]["reason"] == "not consuming cap"
    assert "reason" not in views["alive"]
    assert views["lost"]["state"] == "lost"
    assert views["lost"]["silent_s"] == 60.0
    assert views["alive"]["silent_s"] == 0.0
    assert views["alive"]["in_flight"] == 2
    assert agent_view(STOPPED, AgentStatus.STOPPED, NOW)["state"] == "stopped"


def test_stall_alert_key() -> None:
    assert stall_key("a@h:1", "cap") == "agent.stalled:a@h:1/cap"
