"""What the router knows of itself, the agents and the queues: gauges, threshold rules, samples.

:class:`Monitoring` is the read side the HTTP layer is given (it satisfies
:class:`fabric.router.http.ports.Monitoring`), and the steps of two background loops: the metrics
refresh (:meth:`Monitoring.refresh`: forget old agents, read queue depths and the agent census into
the gauges ``/metrics`` shows, check the threshold rules) and the dashboard sample
(:meth:`Monitoring.take_sample`). The rules' input is the same census and the depths the last
refresh read; the router feeds the error window and the queue ages as events are committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Set
from typing import Any

from fabric.alerts import AlertPublisher
from fabric.errors import StoreError, TransportError
from fabric.metrics import RouterMetrics
from fabric.protocol.messages import Alert
from fabric.router.agents import Agents, Census
from fabric.router.rules import ErrorWindow, QueueAges, RuleEngine, Snapshot
from fabric.router.watchdog import AgentStatus
from fabric.settings import FabricSettings
from fabric.store import StateStore
from fabric.store.base import Sample
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection

log = logging.getLogger("fabric.router")

#: Capability queues whose depth the router reads at most (the first ones by name).
MAX_WATCHED_CAPABILITIES = 500


class Monitoring:
    """The router's gauges, threshold rules and samples, over its store, broker and agent registry.

    ``capabilities``, ``stats`` and ``stopping`` are the router's own (shared, not copied);
    ``is_active`` says whether the router is the active one now, ``claim_active`` claims it (see
    ``Router._claim_active``): only the active router checks the rules and samples.
    """

    def __init__(
        self,
        settings: FabricSettings,
        *,
        store: StateStore,
        amqp: AmqpConnection,
        metrics: RouterMetrics,
        agents: Agents,
        alerts: AlertPublisher,
        capabilities: set[str],
        stats: dict[str, int],
        started_at: float,
        stopping: asyncio.Event,
        is_active: Callable[[], bool],
        claim_active: Callable[[], Awaitable[bool]],
        error_window: ErrorWindow,
        queue_ages: QueueAges,
    ) -> None:
        self.ns = settings.namespace
        self.started_at = started_at
        self.stopping = stopping
        self._history_s = settings.router.history_s
        self._store = store
        self._amqp = amqp
        self._metrics = metrics
        self._agents = agents
        self._alerts = alerts
        self._capabilities = capabilities
        self._stats = stats
        self._is_active = is_active
        self._claim_active = claim_active
        self._rules = RuleEngine(settings.alerts.rules)
        self._error_window = error_window
        self._queue_ages = queue_ages
        #: Tasks ready per capability queue, as the last metrics refresh read them.
        self._queue_depths: dict[str, int] = {}
        #: Totals of the previous sample (the next one stores what moved since).
        self._sampled: tuple[float, dict[str, int]] = (time.time(), dict(metrics.totals))

    # -- what the HTTP layer reads ----------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True once this router consumes submissions or events (the others are standbys)."""
        return self._is_active()

    @property
    def published_capabilities(self) -> Set[str]:
        """Capabilities this router has published tasks to since it started."""
        return frozenset(self._capabilities)

    def counters(self) -> dict[str, int]:
        """What this router did since it started (a copy)."""
        return dict(self._stats)

    def totals(self) -> dict[str, int]:
        """Task and workflow totals since it started, as its metrics count them (a copy)."""
        return dict(self._metrics.totals)

    def firing_alerts(self) -> list[Alert]:
        """The alerts firing now, oldest first."""
        return self._alerts.firing_alerts

    async def agents(self) -> list[dict[str, Any]]:
        """Every agent seen, with its state (``alive``, ``unhealthy``, ``lost``, ``stopped``), by id.
        Agents stopped or lost for longer than ``router.agent_retention_s`` are pruned from the list."""
        return (await self._agents.census()).views()

    async def queue_depths(self, capabilities: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Messages and consumers of each capability's queue, as the broker counts them (passive declares
        on one channel, the first MAX_WATCHED_CAPABILITIES by name); capabilities without a queue are
        left out."""
        queues = {
            names.capability_queue(self.ns, c): c
            for c in sorted(set(capabilities))[:MAX_WATCHED_CAPABILITIES]
        }
        if not queues:
            return {}
        infos = await self._amqp.queue_infos(queues)
        return {
            queues[queue]: {"queue": info.name, "messages": info.messages, "consumers": info.consumers}
            for queue, info in infos.items()
            if info is not None
        }

    async def dead_queue_depth(self) -> dict[str, Any] | None:
        """Messages in the parking queue ``{ns}.dead`` (tasks and anything else parked), or None."""
        info = await self._amqp.queue_info(names.dead_queue(self.ns))
        if info is None:
            return None
        return {"queue": info.name, "messages": info.messages, "consumers": info.consumers}

    # -- the metrics refresh ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """One pass of the metrics refresh: forget agents gone long ago, read the gauges that come from
        the broker and the store (queue depths, live agents), then check the threshold rules."""
        census: Census | None = None
        try:
            await self._agents.prune()
        except (StoreError, TransportError) as exc:
            log.warning("agents not pruned (will try again): %s", exc)
        try:
            census = await self.refresh_gauges()
        except Exception as exc:
            log.debug("metrics refresh failed: %s", exc)
        try:
            await self.check_alert_rules(census=census)
        except Exception as exc:
            log.warning("alert rules not checked: %s", exc)

    async def refresh_gauges(self) -> Census:
        """Read live agents from the store and queue depths from the broker (passive declares, one
        channel), into the gauges ``/metrics`` shows; returns the census read (the rules use it)."""
        census = await self._agents.census()
        counts = census.counts()
        alive_by, open_by = census.serving_by_capability()
        self._metrics.set_agents(
            alive=counts[AgentStatus.ALIVE],
            lost=counts[AgentStatus.LOST],
            unhealthy=counts[AgentStatus.UNHEALTHY],
            stopped=counts[AgentStatus.STOPPED],
            alive_by_capability=alive_by,
            open_by_capability=open_by,
        )
        if not self._amqp.connected:
            return census
        queues = {
            names.submit_queue(self.ns): "",
            names.events_queue(self.ns): "",
            names.dead_queue(self.ns): "",
            **{names.delay_queue(self.ns, tier): "" for tier in names.DELAY_TIERS_MS},
        }
        for capability in sorted(census.capabilities() | self._capabilities)[:MAX_WATCHED_CAPABILITIES]:
            queues[names.capability_queue(self.ns, capability)] = capability
        infos = await self._amqp.queue_infos(queues)
        self._queue_depths = {
            queues[queue]: info.messages
            for queue, info in infos.items()
            if info is not None and queues[queue]
        }
        self._metrics.set_queues(
            {
                queue: None if info is None else (queues[queue], info.messages, info.consumers)
                for queue, info in infos.items()
            }
        )
        return census

    async def check_alert_rules(self, now: float | None = None, *, census: Census | None = None) -> None:
        """Evaluate the threshold rules (:mod:`fabric.router.rules`) on what the last metrics refresh
        read (``census``: the agents it read; without it they are read again), and fire or resolve
        their alerts. Only the active router does: a standby would repeat them.
        """
        if not await self._claim_active():
            return
        now = time.time() if now is None else now
        records = (census or await self._agents.census(now)).records
        verdict = self._rules.check(
            Snapshot(
                now=now,
                queue_depths=dict(self._queue_depths),
                agents=Census.take(records, now).rule_states(),
                attempts=self._error_window.totals(now),
                queue_ages=self._queue_ages.oldest(now),
            )
        )
        for condition in verdict.fire:
            self._alerts.fire(
                condition.key,
                kind=condition.kind,
                severity=condition.severity,
                summary=condition.summary,
                detail=condition.detail,
                labels=condition.labels,
                data=condition.data,
            )
        for key, summary in verdict.clear.items():
            self._alerts.resolve(key, summary=summary)

    # -- dashboard samples ------------------------------------------------------------------------

    async def skip_sample(self) -> None:
        """A standby saw nothing; the active router samples (one series per namespace)."""
        self._sampled = (time.time(), dict(self._metrics.totals))

    async def take_sample(self) -> Sample:
        """Store one sample: what the task and workflow totals moved since the previous one, and the
        queue depths and agents now; samples older than ``history_s`` are dropped."""
        now = time.time()
        since, before = self._sampled
        totals = dict(self._metrics.totals)
        census = await self._agents.census()
        counts = census.counts()
        # An unhealthy agent still heartbeats: it is alive (and may hold tasks), only stalled somewhere.
        alive = census.live()
        capabilities = sorted(census.capabilities() | self._capabilities)
        depths = await self.queue_depths(capabilities[:MAX_WATCHED_CAPABILITIES])
        sample = Sample(
            at=now,
            data={
                "interval_s": round(now - since, 3),
                "moved": {k: v - before.get(k, 0) for k, v in totals.items()},
                "queues": {c: d["messages"] for c, d in depths.items()},
                "agents_alive": len(alive),
                "agents_lost": counts[AgentStatus.LOST],
                "in_flight": sum(int(a.in_flight) for a in alive),
            },
        )
        await self._store.add_sample(sample, keep_since=now - self._history_s)
        self._sampled = (now, totals)
        return sample
