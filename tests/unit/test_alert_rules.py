"""Threshold alert rules as pure functions of snapshots: each condition fires once and clears once."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.protocol.messages import AlertSeverity
from fabric.router.rules import AgentState, ErrorWindow, QueueAges, RuleEngine, Snapshot
from fabric.settings import AlertRuleSettings, CapabilityAlertRules


def snap(now: float = 1000.0, **fields: Any) -> Snapshot:
    return Snapshot(
        now=now,
        queue_depths=fields.get("queue_depths", {}),
        agents=fields.get("agents", []),
        attempts=fields.get("attempts", {}),
        queue_ages=fields.get("queue_ages", {}),
    )


def agent(agent_id: str = "a1", *caps: str, lost: bool = False, **fields: Any) -> AgentState:
    return AgentState(
        agent_id=agent_id,
        capabilities=caps or ("cap",),
        lost=lost,
        draining=fields.get("draining", False),
        last_seen=fields.get("last_seen", 990.0),
        breakers=fields.get("breakers", {}),
        stopped=fields.get("stopped", False),
    )


def keys(conditions: Any) -> list[str]:
    return sorted(c.key for c in conditions)


def test_error_rate_fires_once_over_the_threshold_and_clears_below_80_percent_of_it() -> None:
    engine = RuleEngine(AlertRuleSettings(error_rate=0.5, error_rate_min_attempts=10))
    first = engine.check(snap(attempts={"cap": (10, 5)}))
    (fired,) = first.fire
    assert fired.key == "capability.error_rate:cap"
    assert fired.kind == "capability.error_rate"
    assert fired.severity is AlertSeverity.WARNING
    assert "50% of the attempts of cap failed" in fired.summary
    assert fired.data == {"rate": 0.5, "attempts": 10, "failed": 5, "threshold": 0.5}
    assert engine.check(snap(attempts={"cap": (20, 10)})).fire == [], "still holding: no second alert"
    held = engine.check(snap(attempts={"cap": (20, 9)}))  # 45 %: below the threshold, above 80 % of it
    assert (held.fire, held.clear) == ([], {})
    cleared = engine.check(snap(attempts={"cap": (20, 7)}))  # 35 %
    assert list(cleared.clear) == ["capability.error_rate:cap"]
    assert cleared.clear["capability.error_rate:cap"].startswith("resolved: 50% of the attempts")
    assert engine.check(snap(attempts={"cap": (20, 7)})).clear == {}


def test_too_few_attempts_say_nothing() -> None:
    engine = RuleEngine(AlertRuleSettings(error_rate=0.5, error_rate_min_attempts=10))
    assert engine.check(snap(attempts={"cap": (9, 9)})).fire == []


def test_queue_depth_and_age_with_per_capability_thresholds() -> None:
    rules = AlertRuleSettings(
        queue_depth=100,
        queue_age_s=60,
        capabilities={"llm": CapabilityAlertRules(queue_depth=5, queue_age_s=10)},
    )
    engine = RuleEngine(rules)
    verdict = engine.check(
        snap(
            queue_depths={"llm": 5, "cap": 99},
            queue_ages={"llm": 10.0, "cap": 59.0},
            agents=[agent("a1", "llm", "cap")],
        )
    )
    assert keys(verdict.fire) == ["queue.age:llm", "queue.depth:llm"]
    verdict = engine.check(
        snap(
            queue_depths={"llm": 0, "cap": 100}, queue_ages={"cap": 60.0}, agents=[agent("a1", "llm", "cap")]
        )
    )
    assert keys(verdict.fire) == ["queue.age:cap", "queue.depth:cap"]
    assert sorted(verdict.clear) == ["queue.age:llm", "queue.depth:llm"]


def test_a_threshold_set_to_none_switches_its_rule_off() -> None:
    engine = RuleEngine(
        AlertRuleSettings(error_rate=None, queue_depth=None, queue_age_s=None, no_agent_after_s=None)
    )
    verdict = engine.check(
        snap(queue_depths={"cap": 10**6}, queue_ages={"cap": 10.0**6}, attempts={"cap": (100, 100)})
    )
    assert verdict.fire == []


def test_no_agent_fires_only_after_the_grace_period_and_clears_when_one_comes() -> None:
    engine = RuleEngine(AlertRuleSettings(no_agent_after_s=60))
    assert engine.check(snap(1000, queue_depths={"cap": 3})).fire == []
    assert engine.check(snap(1059, queue_depths={"cap": 3})).fire == []
    (fired,) = engine.check(snap(1060, queue_depths={"cap": 3})).fire
    assert fired.key == "capability.no_agent:cap"
    assert fired.severity is AlertSeverity.CRITICAL
    live = engine.check(snap(1070, queue_depths={"cap": 3}, agents=[agent("a1", "cap")]))
    assert list(live.clear) == ["capability.no_agent:cap"]
    # A lost agent does not count; an empty queue needs nobody.
    assert engine.check(snap(1080, queue_depths={"cap": 0})).fire == []
    lost = [agent(lost=True)]
    assert keys(engine.check(snap(2000, queue_depths={"cap": 1}, agents=lost)).fire) == ["agent.lost:a1"]
    assert keys(engine.check(snap(2060, queue_depths={"cap": 1}, agents=lost)).fire) == [
        "capability.no_agent:cap"
    ]


@pytest.mark.parametrize(
    ("depth", "no_agent", "queue_depth"),
    [
        (1, "1 task of cap waits and no live agent serves it", "1 task waits in the queue of cap (limit 1)"),
        (2, "2 tasks of cap wait and no live agent serves it", "2 tasks wait in the queue of cap (limit 1)"),
    ],
)
def test_summaries_agree_in_number(depth: int, no_agent: str, queue_depth: str) -> None:
    engine = RuleEngine(AlertRuleSettings(no_agent_after_s=0, queue_depth=1))
    fired = {c.kind: c.summary for c in engine.check(snap(queue_depths={"cap": depth})).fire}
    assert fired == {"capability.no_agent": no_agent, "queue.depth": queue_depth}


def test_agent_lost_but_not_after_draining_and_not_forever() -> None:
    engine = RuleEngine(AlertRuleSettings())
    verdict = engine.check(snap(agents=[agent("gone", lost=True), agent("left", lost=True, draining=True)]))
    assert keys(verdict.fire) == ["agent.lost:gone"]
    back = engine.check(snap(agents=[agent("gone")]))
    assert list(back.clear) == ["agent.lost:gone"]
    engine.check(snap(agents=[agent("gone", lost=True)]))
    old = engine.check(snap(now=1000 + 25 * 3600, agents=[agent("gone", lost=True)]))
    assert list(old.clear) == ["agent.lost:gone"], "a day later it is no longer watched"


def test_breaker_open_per_agent_and_capability() -> None:
    engine = RuleEngine(AlertRuleSettings())
    verdict = engine.check(
        snap(
            agents=[
                agent("a1", "x", "y", breakers={"x": "open", "y": "closed"}),
                agent("a2", "x", breakers={"x": "half_open"}),
            ]
        )
    )
    assert keys(verdict.fire) == ["breaker.open:a1/x", "breaker.open:a2/x"]
    verdict = engine.check(
        snap(agents=[agent("a1", "x", breakers={"x": "closed"}), agent("a2", "x", breakers={"x": "open"})])
    )
    assert (verdict.fire, list(verdict.clear)) == ([], ["breaker.open:a1/x"])
    off = RuleEngine(AlertRuleSettings(breaker_open=False, agent_lost=False))
    assert off.check(snap(agents=[agent(lost=True, breakers={"cap": "open"})])).fire == []


def test_error_window_forgets_what_left_the_window() -> None:
    window = ErrorWindow(60, buckets=6)
    for i in range(4):
        window.observe("cap", failed=i % 2 == 0, now=100.0 + i)
    window.observe("other", failed=False, now=130.0)
    assert window.totals(now=140.0) == {"cap": (4, 2), "other": (1, 0)}
    assert window.totals(now=175.0) == {"other": (1, 0)}
    assert window.totals(now=200.0) == {}


def test_queue_ages_follow_tasks_until_they_leave() -> None:
    ages = QueueAges(limit=3)
    ages.ready("cap", ("wf", "a"), at=10.0)
    ages.ready("cap", ("wf", "b"), at=20.0)
    ages.ready("other", ("wf", "c"), at=30.0)
    assert ages.oldest(now=40.0) == {"cap": 30.0, "other": 10.0}
    ages.ready("cap", ("wf", "d"), at=35.0)
    assert len(ages) == 3, "over the limit a task is not followed"
    ages.left(("wf", "a"))
    ages.left(("wf", "c"))
    ages.left(("wf", "nope"))
    assert ages.oldest(now=40.0) == {"cap": 20.0}
    ages.ready("cap", ("wf", "b"), at=39.0)  # a retry: ready again later
    assert ages.oldest(now=40.0) == {"cap": 1.0}


@pytest.mark.parametrize(
    "bad", [{"error_rate": 0}, {"error_rate": 1.5}, {"queue_depth": 0}, {"error_rate_window_s": 1}]
)
def test_bad_thresholds_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AlertRuleSettings(**bad)


def test_a_stopped_agent_is_not_lost_not_live_and_has_no_breaker_alert() -> None:
    engine = RuleEngine(AlertRuleSettings(no_agent_after_s=0))
    stopped = agent("left", stopped=True, last_seen=100.0, breakers={"cap": "open"})
    verdict = engine.check(snap(queue_depths={"cap": 2}, agents=[stopped]))
    assert keys(verdict.fire) == ["capability.no_agent:cap"], "it serves nothing any more; no lost alert"


def test_a_firing_lost_alert_resolves_when_the_agent_reports_it_stopped() -> None:
    engine = RuleEngine(AlertRuleSettings())
    assert keys(engine.check(snap(agents=[agent("a1", lost=True)])).fire) == ["agent.lost:a1"]
    verdict = engine.check(snap(agents=[agent("a1", stopped=True)]))
    assert verdict.fire == []
    assert verdict.clear == {"agent.lost:a1": "resolved: agent a1 reported that it stopped"}
    assert engine.check(snap(agents=[agent("a1", stopped=True)])).clear == {}, "resolved once"


def test_snapshot_agents_may_be_any_iterable() -> None:
    engine = RuleEngine(AlertRuleSettings())
    engine.check(snap(agents=[agent("a1", lost=True)]))
    verdict = engine.check(snap(agents=iter([agent("a1", stopped=True)])))
    assert list(verdict.clear) == ["agent.lost:a1"]
