"""Threshold alert rules: pure state and evaluation, no I/O. The router feeds them and sends the alerts.

The router feeds :class:`ErrorWindow` with every committed attempt outcome and :class:`QueueAges` with
every task it dispatches and every event that shows the task left its queue; every check it builds a
:class:`Snapshot` (queue depths it already reads for ``/metrics``, the agent registry) and asks
:meth:`RuleEngine.check` which conditions start and which clear. One condition is one alert key:

========================  ===================================  ==========  =================================
kind                      key                                  severity    fires while
========================  ===================================  ==========  =================================
``capability.error_rate`` ``capability.error_rate:<cap>``      warning     failed / attempts in the window
                                                                            >= threshold (clears < 80 %)
``queue.depth``           ``queue.depth:<cap>``                warning     tasks ready in the queue >= limit
``queue.age``             ``queue.age:<cap>``                  warning     oldest unstarted task is older
``capability.no_agent``   ``capability.no_agent:<cap>``        critical    work queued, no live agent, for
                                                                            ``no_agent_after_s``
``agent.lost``            ``agent.lost:<agent id>``            warning     an agent missed 3 heartbeats
                                                                            without draining first (an
                                                                            agent that reported it stopped
                                                                            is not lost)
``breaker.open``          ``breaker.open:<agent id>/<cap>``    warning     a live agent's breaker is not
                                                                            closed
========================  ===================================  ==========  =================================
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fabric.protocol.messages import AlertSeverity
from fabric.settings import AlertRuleSettings

#: An error rate clears below this fraction of its threshold, so a rate hovering at it does not flap.
CLEAR_FRACTION = 0.8
#: Buckets the error-rate window is cut into (its resolution).
WINDOW_BUCKETS = 30
#: Agents silent for longer than this are no longer watched (a lost alert about them resolves).
AGENT_WATCH_S = 24 * 3600
#: Tasks :class:`QueueAges` follows at most (beyond, new ones are not followed: ages read low).
MAX_TRACKED_TASKS = 200_000


class ErrorWindow:
    """Attempt outcomes per capability over a sliding window, in buckets.

    Example:
        >>> window = ErrorWindow(60)
        >>> window.observe("cap", failed=True, now=0.0)
        >>> window.totals(now=1.0)
        {'cap': (1, 1)}
    """

    def __init__(self, window_s: float, buckets: int = WINDOW_BUCKETS) -> None:
        self.window_s = window_s
        self._bucket_s = window_s / buckets
        #: capability -> deque of [bucket index, attempts, failed]
        self._counts: dict[str, deque[list[int]]] = {}

    def observe(self, capability: str, *, failed: bool, now: float) -> None:
        bucket = int(now // self._bucket_s)
        buckets = self._counts.setdefault(capability, deque())
        if not buckets or buckets[-1][0] != bucket:
            buckets.append([bucket, 0, 0])
        buckets[-1][1] += 1
        buckets[-1][2] += int(failed)

    def totals(self, now: float) -> dict[str, tuple[int, int]]:
        """``capability -> (attempts, failed)`` within the window ending ``now``; forgets older buckets."""
        oldest = int((now - self.window_s) // self._bucket_s) + 1
        result: dict[str, tuple[int, int]] = {}
        for capability in list(self._counts):
            buckets = self._counts[capability]
            while buckets and buckets[0][0] < oldest:
                buckets.popleft()
            if not buckets:
                del self._counts[capability]
                continue
            result[capability] = (sum(b[1] for b in buckets), sum(b[2] for b in buckets))
        return result


class QueueAges:
    """When each dispatched, not yet started task became ready, per capability (bounded).

    Example:
        >>> ages = QueueAges()
        >>> ages.ready("cap", ("wf", "a"), at=10.0)
        >>> ages.oldest(now=25.0)
        {'cap': 15.0}
        >>> ages.left(("wf", "a"))
    """

    def __init__(self, limit: int = MAX_TRACKED_TASKS) -> None:
        self._limit = limit
        self._ready: dict[tuple[str, str], tuple[str, float]] = {}
        #: capability -> task keys in the order they became ready
        self._order: dict[str, OrderedDict[tuple[str, str], float]] = {}

    def __len__(self) -> int:
        return len(self._ready)

    def ready(self, capability: str, key: tuple[str, str], *, at: float) -> None:
        """The task waits in its capability queue since ``at``."""
        self.left(key)
        if len(self._ready) >= self._limit:
            return
        self._ready[key] = (capability, at)
        self._order.setdefault(capability, OrderedDict())[key] = at

    def left(self, key: tuple[str, str]) -> None:
        """The task left its queue (it started, finished, was cancelled...)."""
        found = self._ready.pop(key, None)
        if found is None:
            return
        order = self._order.get(found[0])
        if order is not None:
            order.pop(key, None)
            if not order:
                del self._order[found[0]]

    def oldest(self, now: float) -> dict[str, float]:
        """``capability -> seconds`` the longest-waiting task has waited (ready order is nearly the
        time order: the few out of order are within the oldest few)."""
        result = {}
        for capability, order in self._order.items():
            head = [at for _, at in zip(range(16), order.values(), strict=False)]
            result[capability] = max(0.0, now - min(head))
        return result


@dataclass(frozen=True)
class AgentState:
    """What the rules need to know of one agent. ``lost`` and ``stopped`` come from the router's one
    judgement of agent state (:func:`fabric.router.watchdog.agent_state`); at most one is true."""

    agent_id: str
    capabilities: tuple[str, ...]
    lost: bool
    draining: bool
    last_seen: float
    breakers: Mapping[str, str] = field(default_factory=dict)
    #: Its last heartbeat said it stopped cleanly: not live, and not lost either.
    stopped: bool = False

    @property
    def live(self) -> bool:
        return not (self.lost or self.stopped)


@dataclass(frozen=True)
class Snapshot:
    """The fabric as the router sees it at one check."""

    now: float
    #: capability -> tasks ready in its queue (capabilities whose queue is known)
    queue_depths: Mapping[str, int]
    agents: Iterable[AgentState]
    #: capability -> (attempts, failed) in the error-rate window
    attempts: Mapping[str, tuple[int, int]]
    #: capability -> seconds its oldest unstarted task has waited
    queue_ages: Mapping[str, float]


@dataclass(frozen=True)
class Condition:
    """One condition that holds now, with what its alert says."""

    key: str
    kind: str
    severity: AlertSeverity
    summary: str
    detail: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """What changed since the last check: conditions that start, keys whose condition cleared (with a
    line saying how)."""

    fire: list[Condition]
    clear: dict[str, str]


class RuleEngine:
    """Evaluates the threshold rules; remembers which conditions hold, so each one fires and clears once.

    Args:
        settings: the thresholds.
    """

    def __init__(self, settings: AlertRuleSettings) -> None:
        self.settings = settings
        #: key -> the condition that fired
        self.active: dict[str, Condition] = {}
        #: capability -> since when it has had queued work and no live agent
        self._orphaned_since: dict[str, float] = {}

    def check(self, snapshot: Snapshot) -> Verdict:
        snapshot = replace(snapshot, agents=list(snapshot.agents))  # read twice below
        holding = {c.key: c for c in self._conditions(snapshot)}
        fire = [c for key, c in holding.items() if key not in self.active]
        stopped = {f"agent.lost:{a.agent_id}": a.agent_id for a in snapshot.agents if a.stopped}
        clear = {
            key: f"resolved: agent {stopped[key]} reported that it stopped" if key in stopped else _cleared(c)
            for key, c in self.active.items()
            if key not in holding
        }
        self.active = {key: self.active.get(key, c) for key, c in holding.items()}
        return Verdict(fire, clear)

    def _conditions(self, snap: Snapshot) -> Iterable[Condition]:
        rules = self.settings
        agents = [a for a in snap.agents if snap.now - a.last_seen <= AGENT_WATCH_S]
        live: dict[str, list[str]] = {}
        for agent in agents:
            if agent.live:
                for capability in agent.capabilities:
                    live.setdefault(capability, []).append(agent.agent_id)
        yield from self._error_rates(snap)
        for capability, depth in sorted(snap.queue_depths.items()):
            limit = rules.threshold(capability, "queue_depth")
            if limit is not None and depth >= limit:
                yield Condition(
                    f"queue.depth:{capability}",
                    "queue.depth",
                    AlertSeverity.WARNING,
                    f"{_tasks(depth)} {_wait(depth)} in the queue of {capability} (limit {limit})",
                    "More work arrives than its agents finish: add workers or concurrency, or check them "
                    f"(`fabric agents`). Live agents: {len(live.get(capability, []))}.",
                    {"capability": capability},
                    {"depth": depth, "threshold": limit},
                )
        for capability, age in sorted(snap.queue_ages.items()):
            limit = rules.threshold(capability, "queue_age_s")
            if limit is not None and age >= limit:
                yield Condition(
                    f"queue.age:{capability}",
                    "queue.age",
                    AlertSeverity.WARNING,
                    f"the oldest task of {capability} has waited {age:.0f}s unstarted (limit {limit:g}s)",
                    "Its agents do not keep up, or none takes it: see `fabric why` on a waiting workflow.",
                    {"capability": capability},
                    {"age_s": round(age, 1), "threshold_s": limit},
                )
        yield from self._orphans(snap, live)
        for agent in agents:
            if rules.agent_lost and agent.lost and not agent.draining:
                yield Condition(
                    f"agent.lost:{agent.agent_id}",
                    "agent.lost",
                    AlertSeverity.WARNING,
                    f"agent {agent.agent_id} is lost: no heartbeat for {snap.now - agent.last_seen:.0f}s",
                    "Its process died or cannot reach the broker; its running tasks are redelivered to "
                    "other agents. Capabilities: " + ", ".join(agent.capabilities),
                    {"agent_id": agent.agent_id},
                    {"last_seen": agent.last_seen, "capabilities": list(agent.capabilities)},
                )
            if rules.breaker_open and agent.live:
                for capability, state in sorted(agent.breakers.items()):
                    if state != "closed":
                        yield Condition(
                            f"breaker.open:{agent.agent_id}/{capability}",
                            "breaker.open",
                            AlertSeverity.WARNING,
                            f"agent {agent.agent_id} stopped taking {capability}: its circuit breaker "
                            f"is {state}",
                            "Its recent attempts kept failing; it probes with one task after the "
                            "cool-down and takes work again when the probe succeeds.",
                            {"agent_id": agent.agent_id, "capability": capability},
                            {"state": state},
                        )

    def _error_rates(self, snap: Snapshot) -> Iterable[Condition]:
        rules = self.settings
        for capability, (attempts, failed) in sorted(snap.attempts.items()):
            threshold = rules.threshold(capability, "error_rate")
            if threshold is None or attempts < rules.error_rate_min_attempts:
                continue
            rate = failed / attempts
            key = f"capability.error_rate:{capability}"
            holds = rate >= (threshold * CLEAR_FRACTION if key in self.active else threshold)
            if holds:
                yield Condition(
                    key,
                    "capability.error_rate",
                    AlertSeverity.WARNING,
                    f"{rate:.0%} of the attempts of {capability} failed in the last "
                    f"{rules.error_rate_window_s:g}s ({failed} of {attempts}; threshold {threshold:.0%})",
                    "See the errors in `fabric status` of a recent workflow and the agents' logs.",
                    {"capability": capability},
                    {"rate": round(rate, 4), "attempts": attempts, "failed": failed, "threshold": threshold},
                )

    def _orphans(self, snap: Snapshot, live: Mapping[str, list[str]]) -> Iterable[Condition]:
        after = self.settings.no_agent_after_s
        waiting = {c for c, depth in snap.queue_depths.items() if depth > 0 and c not in live}
        self._orphaned_since = {c: self._orphaned_since.get(c, snap.now) for c in waiting}
        if after is None:
            return
        for capability in sorted(waiting):
            since = self._orphaned_since[capability]
            if snap.now - since >= after:
                depth = snap.queue_depths[capability]
                yield Condition(
                    f"capability.no_agent:{capability}",
                    "capability.no_agent",
                    AlertSeverity.CRITICAL,
                    f"{_tasks(depth)} of {capability} {_wait(depth)} and no live agent serves it",
                    f"Start a worker whose agent has a handler for {capability!r}.",
                    {"capability": capability},
                    {"depth": depth, "since": since},
                )


def _tasks(count: int) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{count} task" if count == 1 else f"{count} tasks"


def _wait(count: int) -> str:
    """The verb that agrees with :func:`_tasks`."""
    return "waits" if count == 1 else "wait"


def _cleared(condition: Condition) -> str:
    return f"resolved: {condition.summary}"
