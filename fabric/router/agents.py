"""The router's agents: the registry the heartbeats keep, one census of it, and the stall watchdog.

A :class:`Census` is every agent record read at one moment, each judged once by
:func:`fabric.router.watchdog.agent_state`. Every reader of agent state takes one: the gauges
(:meth:`Census.counts`, :meth:`Census.serving_by_capability`), the threshold rules
(:meth:`Census.rule_states`), the dashboard samples and the ``agents`` views (:meth:`Census.views`),
``why`` and the stall watchdog (:meth:`Census.live`). It is pure; :class:`Agents` does the I/O: it
records heartbeats, forgets agents gone long ago, and keeps the stall watchdog's marks (in each agent
record's ``unhealthy``, so a standby and a restarted router keep them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fabric.alerts import AlertPublisher
from fabric.errors import StoreError
from fabric.protocol.messages import AlertSeverity, Heartbeat
from fabric.router import watchdog
from fabric.router.rules import AgentState
from fabric.router.watchdog import AgentStatus
from fabric.store import StateStore
from fabric.store.base import AgentRecord
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection

log = logging.getLogger("fabric.router")

#: Agents whose first heartbeat the router remembers at most (beyond, the memory restarts: an
#: agent's ``first_seen`` then counts from its next heartbeat).
MAX_FIRST_SEEN = 10_000

_CLOSED = "closed"


@dataclass(frozen=True)
class Census:
    """Every agent record read at ``now``, each with its one judged state.

    Example:
        >>> census = Census.take(await store.list_agents(), time.time())
        >>> census.counts()[AgentStatus.ALIVE]
        2
    """

    now: float
    judged: tuple[tuple[AgentRecord, AgentStatus], ...]

    @classmethod
    def take(cls, records: list[AgentRecord], now: float) -> Census:
        return cls(now, tuple((agent, watchdog.agent_state(agent, now)) for agent in records))

    @property
    def records(self) -> list[AgentRecord]:
        return [agent for agent, _ in self.judged]

    def __iter__(self) -> Iterator[tuple[AgentRecord, AgentStatus]]:
        return iter(self.judged)

    def live(self) -> list[AgentRecord]:
        """The agents that heartbeat (alive or unhealthy: an unhealthy agent may hold tasks)."""
        return [agent for agent, state in self.judged if state.live]

    def counts(self) -> dict[AgentStatus, int]:
        """Agents per state (every state, zero included)."""
        counts = dict.fromkeys(AgentStatus, 0)
        for _, state in self.judged:
            counts[state] += 1
        return counts

    def capabilities(self) -> set[str]:
        """Every capability some agent seen serves."""
        return {capability for agent, _ in self.judged for capability in agent.capabilities}

    def serving_by_capability(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per capability: the live agents serving it, and those of them whose breaker is not closed."""
        alive_by: dict[str, int] = {}
        open_by: dict[str, int] = {}
        for agent in self.live():
            for capability in agent.capabilities:
                alive_by[capability] = alive_by.get(capability, 0) + 1
                if agent.breakers.get(capability, _CLOSED) != _CLOSED:
                    open_by[capability] = open_by.get(capability, 0) + 1
        return alive_by, open_by

    def rule_states(self) -> list[AgentState]:
        """What the threshold rules know of each agent."""
        return [
            AgentState(
                agent_id=agent.agent_id,
                capabilities=tuple(agent.capabilities),
                lost=state is AgentStatus.LOST,
                stopped=state is AgentStatus.STOPPED,
                draining=agent.health == "draining",
                last_seen=agent.last_seen,
                breakers=dict(agent.breakers),
            )
            for agent, state in self.judged
        ]

    def stall_candidates(self) -> list[str]:
        """The capabilities an agent could be stalled on (by name): a live agent with room and its
        breaker closed serves them. Only their queues need inspecting."""
        return sorted(
            {
                capability
                for agent in self.live()
                if agent.free_since is not None
                for capability in agent.capabilities
                if agent.breakers.get(capability, _CLOSED) == _CLOSED
            }
        )

    def views(self) -> list[dict[str, Any]]:
        """Every agent as the ``agents`` RPC and the HTTP API show it (:func:`agent_view`)."""
        return [agent_view(agent, state, self.now) for agent, state in self.judged]


def agent_view(agent: AgentRecord, state: AgentStatus, now: float) -> dict[str, Any]:
    """An agent with its state: ``alive``; ``unhealthy`` when the stall watchdog found it not
    consuming a capability whose queue has work (``reason`` says which and why); ``lost`` after three
    missed heartbeats; ``stopped`` when its last heartbeat said it stopped cleanly."""
    view = agent.to_dict()
    view["state"] = str(state)
    if state is AgentStatus.UNHEALTHY:
        view["reason"] = "; ".join(mark["reason"] for mark in agent.unhealthy.values())
    view["silent_s"] = round(now - agent.last_seen, 1)
    return view


def stall_key(agent_id: str, capability: str) -> str:
    """The alert key of a stall."""
    return f"agent.stalled:{agent_id}/{capability}"


class Agents:
    """The agent registry as the router keeps it: heartbeats in, old agents out, stall marks."""

    def __init__(
        self,
        store: StateStore,
        amqp: AmqpConnection,
        alerts: AlertPublisher,
        *,
        namespace: str,
        retention_s: float,
        stall_after_s: float,
    ) -> None:
        self._store = store
        self._amqp = amqp
        self._alerts = alerts
        self._ns = namespace
        self._retention_s = retention_s
        self._stall_after_s = stall_after_s
        self._first_seen: dict[str, float] = {}
        #: Stall watchdog: agent id -> capability -> mark (kept in each agent record's ``unhealthy``).
        self._stalls: dict[str, dict[str, dict[str, Any]]] = {}
        #: Stall watchdog: capability -> since when every check found tasks ready in its queue.
        self._ready_since: dict[str, float] = {}

    async def census(self, now: float | None = None) -> Census:
        """Every agent in the registry, judged at ``now``."""
        records = await self._store.list_agents()
        return Census.take(records, time.time() if now is None else now)

    async def record(self, beat: Heartbeat) -> None:
        """Store the agent record a heartbeat tells (with the stall marks the router keeps for it)."""
        record = AgentRecord(
            agent_id=beat.agent_id,
            agent=beat.agent,
            host=beat.host,
            pid=beat.pid,
            capabilities=beat.capabilities,
            concurrency=beat.concurrency,
            in_flight=beat.in_flight,
            processed=beat.processed,
            failed=beat.failed,
            health=beat.health,
            breakers=beat.breakers,
            interval_s=beat.interval_s,
            free_since=beat.free_since,
            consumers={cap: state.model_dump() for cap, state in beat.consumers.items()},
            unhealthy=dict(self._stalls.get(beat.agent_id, {})),
            last_seen=beat.at,
        )
        first_seen = self._first_seen.setdefault(beat.agent_id, beat.at)
        if len(self._first_seen) > MAX_FIRST_SEEN:
            self._first_seen.clear()  # bounded; first_seen then restarts from the next beat
        record.first_seen = first_seen
        with contextlib.suppress(StoreError):
            await self._store.put_agent(record)
        if beat.health == "stopped":
            log.info("agent %s stopped (processed %d, failed %d)", beat.agent_id, beat.processed, beat.failed)
            self._first_seen.pop(beat.agent_id, None)

    async def prune(self, now: float | None = None) -> list[str]:
        """Remove the agents stopped or lost for longer than the retention from the registry
        (:func:`fabric.router.watchdog.expired`); returns their ids."""
        now = time.time() if now is None else now
        retention_s = self._retention_s
        gone = watchdog.expired(await self._store.list_agents(), now=now, retention_s=retention_s)
        if not gone:
            return []
        removed = await self._store.prune_agents([a.agent_id for a in gone], seen_before=now - retention_s)
        for agent_id in removed:
            self._first_seen.pop(agent_id, None)
        if removed:
            log.info(
                "forgot %d agent(s) stopped or lost for more than %gs: %s",
                len(removed),
                retention_s,
                ", ".join(removed),
            )
        return removed

    async def load_stalls(self) -> None:
        """Take the stall marks from the store (kept there by the active router)."""
        with contextlib.suppress(StoreError):
            self._stalls = {
                a.agent_id: dict(a.unhealthy) for a in await self._store.list_agents() if a.unhealthy
            }

    async def check_stalls(self, now: float | None = None) -> None:
        """One pass of the stall watchdog (see :mod:`fabric.router.watchdog`): mark agents that heartbeat
        but do not consume although their queue has work ``unhealthy`` and alert; clear and resolve
        the ones that consume again."""
        census = await self.census(now)
        now = census.now
        agents = {a.agent_id: a for a in census.records}
        capabilities = census.stall_candidates()
        infos = await self._amqp.queue_infos(names.capability_queue(self._ns, c) for c in capabilities)
        queues: dict[str, watchdog.QueueWork] = {}
        for capability in capabilities:
            info = infos.get(names.capability_queue(self._ns, capability))
            if info is None or info.messages == 0:
                continue
            since = self._ready_since.setdefault(capability, now)
            queues[capability] = watchdog.QueueWork(info.messages, since)
        self._ready_since = {c: t for c, t in self._ready_since.items() if c in queues}

        changed: set[str] = set()
        for agent_id, marks in list(self._stalls.items()):
            agent = agents.get(agent_id)
            ended = (
                watchdog.cleared(agent, marks, now=now)
                if agent is not None
                else [watchdog.Cleared(agent_id, c, "the agent is gone from the registry") for c in marks]
            )
            for end in ended:
                marks.pop(end.capability, None)
                changed.add(agent_id)
                log.warning("agent %s is healthy again on %s: %s", agent_id, end.capability, end.why)
                self._alerts.resolve(
                    stall_key(agent_id, end.capability), summary=f"agent {agent_id}: {end.why}"
                )
            if not marks:
                del self._stalls[agent_id]
        stalls = watchdog.find_stalls(agents.values(), queues, now=now, stall_after_s=self._stall_after_s)
        for stall in stalls:
            marks = self._stalls.setdefault(stall.agent_id, {})
            if stall.capability not in marks:
                marks[stall.capability] = stall.mark(now)
                changed.add(stall.agent_id)
                log.warning("agent %s is unhealthy: %s", stall.agent_id, stall.reason)
        # Every mark is firing: after a router restart (the marks come back from the store, the alert
        # publisher's memory does not) a stall still marked fires once more, and can be resolved.
        for agent_id, marks in self._stalls.items():
            for capability, mark in marks.items():
                self._alerts.fire(
                    stall_key(agent_id, capability),
                    kind="agent.stalled",
                    severity=AlertSeverity.WARNING,
                    summary=f"agent {agent_id}: {mark.get('reason', 'not consuming')}",
                    detail="The agent heartbeats but takes no task of this capability although its "
                    "queue has work and it has free slots. Check its broker connection and its log, or "
                    "restart it; the alert resolves when it takes a task again.",
                    labels={"agent_id": agent_id, "capability": capability},
                    data={k: v for k, v in mark.items() if k != "reason"},
                )
        for agent_id in changed:
            agent = agents.get(agent_id)
            if agent is not None:
                agent.unhealthy = dict(self._stalls.get(agent_id, {}))
                await self._store.put_agent(agent)
