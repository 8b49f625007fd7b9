"""The router's judgement of agents: what state each one is in, which to forget, and the stall
watchdog that finds agents that heartbeat but do not consume although work waits.

Every place that shows or acts on an agent's state (the ``agents`` RPC and CLI, the HTTP API and the
dashboard, the metrics gauge, the alert rules, ``why``) asks :func:`agent_state`: an agent is
``stopped`` when its last heartbeat said so (a clean stop), ``lost`` after three missed heartbeats,
``unhealthy`` while the stall watchdog has marked it, else ``alive``. :func:`expired` says which
stopped or lost agents have been silent past the retention and leave the registry.

Pure: it judges agent records (from heartbeats) and queue observations; the router does the I/O
(passive declares, the store, alerts). An agent is **stalled** on a capability when all of these hold:

* it is alive (heartbeats arrive), not draining, and serves the capability;
* its circuit breaker for the capability is closed (an open breaker is its own, visible state: the
  agent stopped consuming on purpose);
* it has had a free slot (``in_flight < concurrency``) for at least ``stall_after_s`` without a break:
  an agent busy at its concurrency limit is healthy, whatever the queue holds;
* the capability's queue has had tasks ready at every check for at least ``stall_after_s``;
* it got no task of the capability for ``stall_after_s``: its last delivery, its last (re)subscription
  and the start of its free period are all older than that.

Ages are taken on the agent's own clock, up to its last heartbeat (``last_seen - since``), so a skewed
clock between the agent's host and the router's cannot fake a stall. A stall **clears** when the
agent gets a task of the capability again (consumes again), or when it stops being judged: it is lost,
draining, its breaker opened, or it no longer serves the capability.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fabric.store.base import AgentRecord

#: Missed heartbeats after which an agent is ``lost`` (plus one second of slack).
LOST_AFTER_BEATS = 3


class AgentStatus(enum.StrEnum):
    """An agent's state as the router judges it (:func:`agent_state`)."""

    ALIVE = "alive"
    UNHEALTHY = "unhealthy"
    LOST = "lost"
    STOPPED = "stopped"

    @property
    def live(self) -> bool:
        """It heartbeats (an unhealthy agent too: it may hold tasks, only stalled somewhere)."""
        return self in (AgentStatus.ALIVE, AgentStatus.UNHEALTHY)


def agent_state(agent: AgentRecord, now: float) -> AgentStatus:
    """The one judgement of an agent's state.

    ``stopped``: its last heartbeat said it stopped cleanly, however long ago. ``lost``: three
    heartbeats missed (``now`` on the router's clock against ``last_seen``). ``unhealthy``: the stall
    watchdog marked it on some capability. Else ``alive``.

    Example:
        >>> record = AgentRecord(
        ...     agent_id="a@h:1", agent="a", host="h", pid=1, capabilities=["cap"], concurrency=1,
        ...     health="stopped", last_seen=100.0,
        ... )
        >>> agent_state(record, now=9999.0)
        <AgentStatus.STOPPED: 'stopped'>
    """
    if agent.health == "stopped":
        return AgentStatus.STOPPED
    if now - agent.last_seen > LOST_AFTER_BEATS * agent.interval_s + 1:
        return AgentStatus.LOST
    if agent.unhealthy:
        return AgentStatus.UNHEALTHY
    return AgentStatus.ALIVE


def is_lost(agent: AgentRecord, now: float) -> bool:
    """True after three missed heartbeats (an agent that stopped cleanly is not lost)."""
    return agent_state(agent, now) is AgentStatus.LOST


def is_live(agent: AgentRecord, now: float) -> bool:
    """True while it heartbeats: alive or unhealthy."""
    return agent_state(agent, now).live


def expired(agents: Iterable[AgentRecord], *, now: float, retention_s: float) -> list[AgentRecord]:
    """The agents to remove from the registry: stopped or lost, and silent for more than
    ``retention_s`` (their last heartbeat, on their own clock, against ``now``)."""
    return [
        agent for agent in agents if not agent_state(agent, now).live and now - agent.last_seen > retention_s
    ]


@dataclass(frozen=True, slots=True)
class QueueWork:
    """What the router saw of a capability queue: tasks ready now, and since when (router clock) every
    check found some."""

    ready: int
    since: float


@dataclass(frozen=True, slots=True)
class Stall:
    """A capability an agent has stopped consuming although its queue has work."""

    agent_id: str
    capability: str
    #: Seconds without a task of the capability while the agent had room (agent clock).
    quiet_s: float
    #: Tasks ready in the queue at the last check.
    ready: int
    #: What the agent's heartbeat said of its consumer (False: not subscribed).
    consuming: bool
    #: The agent's last delivery of the capability when the stall was found (agent clock).
    last_delivery_at: float | None
    reason: str

    def mark(self, now: float) -> dict[str, Any]:
        """The entry stored in the agent record's ``unhealthy`` map."""
        return {
            "reason": self.reason,
            "since": now,
            "quiet_s": round(self.quiet_s, 1),
            "last_delivery_at": self.last_delivery_at,
        }


@dataclass(frozen=True, slots=True)
class Cleared:
    """A stall that ended, and why."""

    agent_id: str
    capability: str
    why: str


def _judged(agent: AgentRecord, capability: str, now: float) -> str | None:
    """Why the agent is not judged on this capability now; None when it is."""
    state = agent_state(agent, now)
    if state is AgentStatus.STOPPED:
        return "the agent stopped"
    if state is AgentStatus.LOST:
        return "the agent is lost (no heartbeats)"
    if agent.health == "draining":
        return "the agent is draining"
    if capability not in agent.capabilities:
        return f"the agent no longer serves {capability}"
    breaker = agent.breakers.get(capability, "closed")
    if breaker != "closed":
        return f"its circuit breaker for {capability} is {breaker}"
    return None


def find_stalls(
    agents: Iterable[AgentRecord],
    queues: Mapping[str, QueueWork],
    *,
    now: float,
    stall_after_s: float,
) -> list[Stall]:
    """Every (agent, capability) stalled now; see the module docstring for the rule.

    Args:
        agents: agent records as the heartbeats left them.
        queues: per capability whose queue had tasks ready at the last check, what was seen.
        now: the router's clock (seconds since the epoch).
        stall_after_s: how long the conditions must hold.
    """
    stalls = []
    for agent in agents:
        if agent.free_since is None:
            continue  # busy at its concurrency limit: healthy
        for capability in agent.capabilities:
            work = queues.get(capability)
            state = agent.consumers.get(capability)
            if work is None or state is None or work.ready <= 0:
                continue
            if _judged(agent, capability, now) is not None:
                continue
            if now - work.since < stall_after_s:
                continue  # the queue has not had work for long enough
            last_delivery = state.get("last_delivery_at")
            marks = [agent.free_since, state.get("subscribed_at"), last_delivery, agent.first_seen]
            since = max(float(m) for m in marks if m is not None)
            quiet_s = agent.last_seen - since
            if quiet_s < stall_after_s:
                continue
            consuming = bool(state.get("consuming", True))
            free = agent.concurrency - agent.in_flight
            queue_note = f"while {work.ready} task(s) wait in its queue"
            if consuming:
                reason = (
                    f"subscribed to {capability} but no task delivered for {quiet_s:.0f}s {queue_note} "
                    f"and {free} of {agent.concurrency} slot(s) are free"
                )
            else:
                reason = (
                    f"not consuming {capability} (its consumer is gone) for {quiet_s:.0f}s {queue_note} "
                    f"and {free} of {agent.concurrency} slot(s) are free"
                )
            stalls.append(
                Stall(
                    agent_id=agent.agent_id,
                    capability=capability,
                    quiet_s=quiet_s,
                    ready=work.ready,
                    consuming=consuming,
                    last_delivery_at=last_delivery,
                    reason=reason,
                )
            )
    return stalls


def cleared(agent: AgentRecord, marks: Mapping[str, Mapping[str, Any]], *, now: float) -> list[Cleared]:
    """The stalls in ``marks`` (capability -> mark) of this agent that have ended, with why."""
    ended = []
    for capability, mark in marks.items():
        why = _judged(agent, capability, now)
        if why is None:
            state = agent.consumers.get(capability) or {}
            last = state.get("last_delivery_at")
            before = mark.get("last_delivery_at")
            if last is not None and (before is None or float(last) > float(before)):
                why = f"it consumes {capability} again"
        if why is not None:
            ended.append(Cleared(agent.agent_id, capability, why))
    return ended
