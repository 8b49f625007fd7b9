"""The router's stall watchdog rule, without a broker: who is stalled, who is not, when it clears."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.router.watchdog import AgentStatus, QueueWork, agent_state, cleared, expired, find_stalls
from fabric.store.base import AgentRecord

NOW = 10_000.0
STALL_AFTER = 60.0
CAP = "llm.call"


def agent(
    *,
    free_since: float | None = NOW - 300,
    in_flight: int = 0,
    concurrency: int = 4,
    last_delivery_at: float | None = NOW - 300,
    subscribed_at: float = NOW - 600,
    consuming: bool = True,
    breaker: str = "closed",
    health: str = "ok",
    last_seen: float = NOW,
    **extra: Any,
) -> AgentRecord:
    return AgentRecord(
        agent_id="a1",
        agent="a",
        host="h",
        pid=1,
        capabilities=[CAP],
        concurrency=concurrency,
        in_flight=in_flight,
        health=health,
        breakers={CAP: breaker},
        interval_s=5.0,
        free_since=free_since,
        consumers={
            CAP: {
                "consuming": consuming,
                "subscribed_at": subscribed_at,
                "last_delivery_at": last_delivery_at,
                "deliveries": 3,
                "score": 10,
            }
        },
        first_seen=NOW - 900,
        last_seen=last_seen,
        **extra,
    )


WORK = {CAP: QueueWork(ready=5, since=NOW - 120)}


def stalls(record: AgentRecord, queues: dict[str, QueueWork] = WORK) -> list[Any]:
    return find_stalls([record], queues, now=NOW, stall_after_s=STALL_AFTER)


def test_idle_agent_with_work_waiting_and_no_deliveries_is_stalled() -> None:
    (stall,) = stalls(agent())
    assert stall.agent_id == "a1"
    assert stall.capability == CAP
    assert stall.quiet_s == 300
    assert "no task delivered for 300s while 5 task(s) wait" in stall.reason
    assert "4 of 4 slot(s) are free" in stall.reason


def test_a_cancelled_consumer_is_named_in_the_reason() -> None:
    (stall,) = stalls(agent(consuming=False))
    assert "not consuming llm.call (its consumer is gone)" in stall.reason


def test_busy_at_its_concurrency_limit_is_healthy() -> None:
    assert stalls(agent(free_since=None, in_flight=4)) == []


def test_an_open_or_half_open_breaker_is_not_a_stall() -> None:
    assert stalls(agent(breaker="open")) == []
    assert stalls(agent(breaker="half_open")) == []


def test_lost_and_draining_agents_are_not_judged() -> None:
    assert stalls(agent(last_seen=NOW - 60)) == [], "lost: three missed heartbeats"
    assert stalls(agent(health="draining")) == []


def test_no_stall_without_work_or_before_the_time_is_up() -> None:
    assert stalls(agent(), {}) == [], "empty queue"
    assert stalls(agent(), {CAP: QueueWork(ready=5, since=NOW - 10)}) == [], "work only just arrived"
    assert stalls(agent(last_delivery_at=NOW - 30)) == [], "a recent delivery"
    assert stalls(agent(subscribed_at=NOW - 30)) == [], "just subscribed again"
    assert stalls(agent(free_since=NOW - 30)) == [], "was at its limit until 30s ago"


def test_quiet_time_is_measured_on_the_agents_own_clock() -> None:
    # The agent's clock runs 10 minutes behind the router's: its own times, compared with each other,
    # still say it took a task 30 s before its last heartbeat.
    skewed = agent(
        last_seen=NOW - 600, last_delivery_at=NOW - 630, free_since=NOW - 900, subscribed_at=NOW - 900
    )
    skewed.interval_s = 1000  # not lost either
    assert stalls(skewed) == []


def test_a_stall_clears_when_the_agent_consumes_again() -> None:
    (stall,) = stalls(agent())
    marks = {CAP: stall.mark(NOW)}
    assert cleared(agent(), marks, now=NOW + 5) == [], "nothing new: still stalled"
    (end,) = cleared(agent(last_delivery_at=NOW + 3), marks, now=NOW + 5)
    assert end.why == "it consumes llm.call again"
    never = {CAP: stalls(agent(last_delivery_at=None))[0].mark(NOW)}
    assert cleared(agent(last_delivery_at=NOW + 1), never, now=NOW + 5)


def test_a_stall_clears_when_the_agent_is_no_longer_judged() -> None:
    marks = {CAP: stalls(agent())[0].mark(NOW)}
    assert "lost" in cleared(agent(last_seen=NOW - 100), marks, now=NOW)[0].why
    assert "open" in cleared(agent(breaker="open"), marks, now=NOW)[0].why
    assert "draining" in cleared(agent(health="draining"), marks, now=NOW)[0].why


def test_a_stopped_agent_is_not_judged_and_its_stall_clears() -> None:
    assert stalls(agent(health="stopped")) == []
    marks = {CAP: stalls(agent())[0].mark(NOW)}
    assert cleared(agent(health="stopped"), marks, now=NOW)[0].why == "the agent stopped"


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({}, AgentStatus.ALIVE),
        ({"last_seen": NOW - 16.5}, AgentStatus.LOST),  # 3 x 5 s + 1 s of slack
        ({"last_seen": NOW - 15.5}, AgentStatus.ALIVE),
        ({"unhealthy": {CAP: {"reason": "quiet"}}}, AgentStatus.UNHEALTHY),
        ({"unhealthy": {CAP: {"reason": "quiet"}}, "last_seen": NOW - 60}, AgentStatus.LOST),
        ({"health": "draining"}, AgentStatus.ALIVE),
        ({"health": "draining", "last_seen": NOW - 60}, AgentStatus.LOST),
        ({"health": "stopped"}, AgentStatus.STOPPED),
        ({"health": "stopped", "last_seen": NOW - 86_400}, AgentStatus.STOPPED),  # however long ago
        ({"health": "stopped", "unhealthy": {CAP: {"reason": "quiet"}}}, AgentStatus.STOPPED),
    ],
)
def test_agent_state(fields: dict[str, Any], state: AgentStatus) -> None:
    assert agent_state(agent(**fields), NOW) is state
    assert state.live is (state in (AgentStatus.ALIVE, AgentStatus.UNHEALTHY))


def test_expired_agents_are_the_stopped_and_lost_ones_silent_past_the_retention() -> None:
    def named(agent_id: str, interval_s: float = 5.0, **fields: Any) -> AgentRecord:
        record = agent(**fields)
        record.agent_id = agent_id
        record.interval_s = interval_s
        return record

    agents = [
        named("alive"),
        named("lost-old", last_seen=NOW - 3601),
        named("lost-recent", last_seen=NOW - 60),
        named("stopped-old", health="stopped", last_seen=NOW - 3601),
        named("stopped-recent", health="stopped", last_seen=NOW - 10),
        # A live agent whose clock runs far behind is never removed: it heartbeats.
        named("skewed", last_seen=NOW - 7200, interval_s=10_000),
    ]
    gone = expired(agents, now=NOW, retention_s=3600)
    assert [a.agent_id for a in gone] == ["lost-old", "stopped-old"]
