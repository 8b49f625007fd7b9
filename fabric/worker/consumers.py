"""The worker's consumers, one per capability queue: circuit breakers (and their probes), the agent's
score (its consumer ``x-priority``), the record of deliveries the heartbeat reports, and the watchdog
that subscribes again a consumer the broker dropped.

A breaker opened by failures stops its capability's consumer; after each cool-down one task is
fetched (basic.get) and run as the probe, until the breaker closes and the consumer resumes. Every
consumer starts at the top score and moves with its record of recent outcomes and the worker's load.

Example:
    >>> consumers = Consumers(
    ...     agent, settings, amqp, draining=..., run=..., give_back=..., on_fatal=..., busy=...
    ... )
    >>> consumers.subscribed(await amqp.consume_many(...))
    >>> consumers.record("demo.echo", outcome, duration_s=0.2)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from fabric.errors import FabricError, TransportError
from fabric.policy import score as scoring
from fabric.policy.breaker import BreakerState, CircuitBreaker
from fabric.protocol.messages import ConsumerState, EventStatus
from fabric.settings import FabricSettings
from fabric.topology import spec
from fabric.transport.amqp import AmqpConnection, Consumer, Delivery
from fabric.worker.agent import Agent, Handler
from fabric.worker.outcome import Outcome
from fabric.worker.settlement import NACK_PAUSE_S

log = logging.getLogger("fabric.worker")

#: Weight of the newest load sample in the smoothed load (an exponential moving average).
LOAD_SMOOTHING = 0.3
#: Seconds between looks at an empty queue while a circuit breaker is half-open (basic.get polls).
PROBE_POLL_S = 0.25


class Consumers:
    """The consumers of an agent's capabilities, their breakers and their scores.

    Args:
        agent: whose capabilities are consumed.
        settings: the worker's settings (breaker, score, watchdog).
        amqp: the worker's broker connection (for the watchdog's declares).
        draining: True once the worker takes no new tasks (the loops end then).
        run: runs a delivered task (a probe), as the consumer's callback does.
        give_back: returns a task this worker will not start to its queue, fresh.
        on_fatal: the worker cannot consume any more: it must stop.
        busy: the share of the worker's slots taken now (the score's load input).
    """

    def __init__(
        self,
        agent: Agent,
        settings: FabricSettings,
        amqp: AmqpConnection,
        *,
        draining: Callable[[], bool],
        run: Callable[[Handler, Delivery], Awaitable[None]],
        give_back: Callable[[Delivery], Awaitable[None]],
        on_fatal: Callable[[], None],
        busy: Callable[[], float],
    ) -> None:
        worker = settings.worker
        self._agent = agent
        self._settings = worker
        self._ns = settings.namespace
        self._amqp = amqp
        self._draining = draining
        self._run = run
        self._give_back = give_back
        self._on_fatal = on_fatal
        self._busy = busy
        self.breakers = {
            capability: CircuitBreaker(
                failure_threshold=worker.breaker_failures, cooldown_s=worker.breaker_cooldown_s
            )
            for capability in agent.capabilities
        }
        #: The consumer of each capability (once subscribed).
        self.of: dict[str, Consumer] = {}
        #: The breaker loop of each capability whose breaker is not closed (see keep_breaker).
        self._probes: dict[str, asyncio.Task[None]] = {}
        # Agent health per capability: recent outcomes (the score's input), deliveries, subscriptions.
        self._recent = {
            capability: scoring.RecentOutcomes(window_s=worker.score_window_s)
            for capability in agent.capabilities
        }
        self._deliveries = dict.fromkeys(agent.capabilities, 0)
        self._last_delivery: dict[str, float] = {}
        self._subscribed_at: dict[str, float] = {}
        self._rescored_at: dict[str, float] = {}
        #: Smoothed load (busy slots / concurrency), sampled at each heartbeat: the score's load input.
        self._load = 0.0

    def subscribed(self, consumers: Sequence[Consumer]) -> None:
        """The consumers of the agent's capabilities (in their order) are subscribed now."""
        self.of = dict(zip(self._agent.capabilities, consumers, strict=True))
        self._subscribed_at = dict.fromkeys(self._agent.capabilities, time.time())

    def delivered(self, capability: str) -> None:
        """A task of ``capability`` was delivered."""
        self._deliveries[capability] += 1
        self._last_delivery[capability] = time.time()

    def idle(self) -> list[str]:
        """The queues not consumed though their breaker is closed (an open one is not consumed on
        purpose: that is not a fault)."""
        return [
            consumer.queue_name
            for capability, consumer in self.of.items()
            if not consumer.healthy and self.breakers[capability].state is BreakerState.CLOSED
        ]

    def breaker_states(self) -> dict[str, str]:
        return {capability: str(breaker.state) for capability, breaker in self.breakers.items()}

    def stop(self) -> None:
        """The worker closes: the breaker loops end."""
        for probe in self._probes.values():
            probe.cancel()

    # -- circuit breakers -------------------------------------------------------------------------

    def record(self, capability: str, outcome: Outcome, duration_s: float) -> None:
        """Feed an attempt's outcome to its capability's breaker (when it opens, stop consuming) and,
        with its duration, to the capability's recent record (the score)."""
        if not outcome.counts_for_health:
            return  # the input's fault or an operator's decision, not this agent's health
        self._count_for_breaker(capability, outcome)
        self._recent[capability].add(
            time.time(), ok=outcome.status is EventStatus.SUCCEEDED, duration_s=duration_s
        )

    def _count_for_breaker(self, capability: str, outcome: Outcome) -> None:
        breaker = self.breakers[capability]
        before = breaker.state
        after = breaker.record(outcome.status is EventStatus.SUCCEEDED)
        if after is BreakerState.OPEN and before is BreakerState.CLOSED:
            log.warning(
                "circuit breaker of %s opened after failures; not taking its tasks for %.0fs",
                capability,
                breaker.cooldown_s,
            )
        elif after is BreakerState.OPEN and before is BreakerState.HALF_OPEN:
            log.warning(
                "the probe of %s failed: circuit breaker open again for %.0fs", capability, breaker.cooldown_s
            )
        elif after is BreakerState.CLOSED and before is BreakerState.HALF_OPEN:
            log.info("circuit breaker of %s closed: the probe succeeded", capability)
        if after is BreakerState.OPEN:
            self.keep_breaker(capability)

    def keep_breaker(self, capability: str) -> None:
        """Start the capability's breaker loop, unless it runs already (it runs until the breaker closes)."""
        running = self._probes.get(capability)
        if running is None or running.done():
            self._probes[capability] = asyncio.create_task(
                self._breaker_loop(capability), name=f"fabric-breaker-{capability}"
            )

    async def _resume(self, capability: str) -> None:
        await self.of[capability].resume()
        self._subscribed_at[capability] = time.time()

    async def _breaker_loop(self, capability: str) -> None:
        """While the breaker is not closed: not consuming the capability; after each cool-down, fetch
        one task (basic.get) and run it as the probe. Ends when the breaker closes (consuming again)
        or the worker drains.

        A probe that ends without an outcome (handed back because it avoids this agent, malformed,
        cancelled, aborted, a copy of an attempt held here) releases its claim, so the next task
        probes: a half-open breaker never waits on nothing.
        """
        consumer = self.of[capability]
        breaker = self.breakers[capability]
        handler = self._agent.handlers[capability]
        await consumer.cancel()
        while not self._draining():
            state = breaker.state
            if state is BreakerState.OPEN:
                await asyncio.sleep(max(PROBE_POLL_S / 5, breaker.seconds_until_probe()))
                continue
            try:
                if state is BreakerState.CLOSED:
                    await self._resume(capability)
                    if breaker.state is BreakerState.CLOSED:
                        return
                    await consumer.cancel()  # opened again while subscribing (tasks in flight failed)
                    continue
                probe = await consumer.get_one()
            except TransportError as exc:
                log.warning("circuit breaker of %s: %s; trying again", capability, exc)
                await asyncio.sleep(NACK_PAUSE_S)
                continue
            if probe is None:
                await asyncio.sleep(PROBE_POLL_S)  # nothing queued: stay half-open, look again
                continue
            if not breaker.try_probe():
                # A task taken before the breaker opened ended meanwhile and closed (or reopened) it:
                # this one is no probe. Back it goes, fresh (a nack would make it a lost attempt).
                await self._give_back(probe)
                continue
            log.info("circuit breaker of %s half-open: running one probe task", capability)
            try:
                # The probe's outcome closes the breaker or opens it again (record).
                await self._run(handler, probe)
            finally:
                if breaker.release_probe():
                    log.debug(
                        "the probe of %s ended without an outcome (handed back, malformed, cancelled "
                        "or aborted): the next task probes",
                        capability,
                    )

    # -- watchdog ---------------------------------------------------------------------------------

    async def watchdog(self) -> None:
        """Subscribe again any consumer the broker dropped (its queue deleted: a basic.cancel closes
        nothing, so the robust connection does not notice). A worker never stays alive and idle: if
        the queue cannot be declared and consumed again, the worker stops (exit code non-zero)."""
        interval = self._settings.watchdog_interval_s
        while not self._draining():
            await asyncio.sleep(interval)
            if not self._amqp.connected:
                continue  # reconnecting: the robust connection restores the consumers itself
            for capability, consumer in self.of.items():
                if (
                    consumer.healthy
                    or not consumer.active
                    or self.breakers[capability].state is not BreakerState.CLOSED
                ):
                    continue
                log.warning(
                    "the broker stopped delivering %s (queue deleted?); subscribing again",
                    consumer.queue_name,
                )
                try:
                    await self._amqp.forget(spec.capability(self._ns, capability))
                    await self._amqp.declare(spec.capability(self._ns, capability))
                    await consumer.resubscribe()
                    self._subscribed_at[capability] = time.time()
                except FabricError as exc:
                    log.critical(
                        "cannot consume %s again (%s); stopping this worker", consumer.queue_name, exc
                    )
                    self._on_fatal()
                    return

    # -- scoring ----------------------------------------------------------------------------------

    async def rescore(self) -> None:
        """Score every capability again; consume with the new score as ``x-priority`` when it left its
        bucket (hysteresis) and the capability was not re-subscribed too recently. A failure is
        logged: priorities stay as they are."""
        try:
            await self._rescore()
        except Exception:
            log.critical("scoring failed; priorities stay as they are", exc_info=True)

    async def _rescore(self) -> None:
        worker = self._settings
        busy = self._busy()
        # Smoothed: the load sampled at one heartbeat swings with every task; its average does not.
        self._load += LOAD_SMOOTHING * (busy - self._load)
        now = time.time()
        for capability, consumer in self.of.items():
            record = self._recent[capability].record(now)
            raw = scoring.raw_score(
                record.success_rate,
                record.latency_s,
                self._load,
                latency_ref_s=worker.score_latency_ref_s,
            )
            current = consumer.priority if consumer.priority is not None else scoring.MAX_SCORE
            wanted = scoring.rebucket(raw, current)
            if wanted == current:
                continue
            if now - self._rescored_at.get(capability, 0.0) < worker.rescore_min_interval_s:
                continue
            self._rescored_at[capability] = now
            log.info(
                "score of %s: %d -> %d (success %s, latency %s, load %.2f): consuming with that x-priority",
                capability,
                current,
                wanted,
                "-" if record.success_rate is None else f"{record.success_rate:.2f}",
                "-" if record.latency_s is None else f"{record.latency_s:.3f}s",
                self._load,
            )
            try:
                await consumer.set_priority(wanted)
            except TransportError as exc:
                log.warning("could not consume %s with priority %d: %s", capability, wanted, exc)
            else:
                if consumer.active:
                    self._subscribed_at[capability] = time.time()

    def states(self) -> dict[str, ConsumerState]:
        """Each capability's consumer as the heartbeat reports it."""
        now = time.time()
        states = {}
        for capability, consumer in self.of.items():
            record = self._recent[capability].record(now)
            states[capability] = ConsumerState(
                consuming=consumer.healthy,
                subscribed_at=self._subscribed_at.get(capability),
                last_delivery_at=self._last_delivery.get(capability),
                deliveries=self._deliveries[capability],
                score=consumer.priority,
                success_rate=None if record.success_rate is None else round(record.success_rate, 4),
                latency_ms=None if record.latency_s is None else round(record.latency_s * 1000, 3),
            )
        return states
