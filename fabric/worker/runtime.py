"""The worker runtime: wires the worker's parts and runs its lifecycle (start, drain, close).

Each delivered task goes through one pipeline (:mod:`.pipeline`): adopted, dropped, handed on, a lost
attempt, or run (:mod:`.execution`, :mod:`.lease`) and its outcome (:mod:`.outcome`, pure) carried out
in the contract's order, copy, then event, then ack (:mod:`.settlement`, docs/protocol.md §5).

All capability queues are consumed on one channel with one prefetch limit, so a worker never holds more
than ``concurrency`` unacked tasks in all; their breakers and scores are in :mod:`.consumers`, the
heartbeats in :mod:`.heartbeat`, the loops that keep them in named background tasks
(:mod:`.background`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from typing import Any, Self

from fabric.errors import (
    NotConnectedError,
)
from fabric.health import HealthServer, serve_health
from fabric.metrics import WorkerMetrics
from fabric.policy import (
    FailurePolicy,
    RetryPolicy,
)
from fabric.policy import score as scoring
from fabric.protocol.messages import (
    Heartbeat,
    HeartbeatHealth,
)
from fabric.settings import FabricSettings
from fabric.telemetry import Telemetry
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker import background
from fabric.worker.agent import Agent
from fabric.worker.attempts import AttemptsBook, Running
from fabric.worker.cancels import CancelSync
from fabric.worker.consumers import Consumers
from fabric.worker.execution import Execution
from fabric.worker.heartbeat import Heartbeats
from fabric.worker.lease import Leases
from fabric.worker.pipeline import Parts, Pipeline
from fabric.worker.settlement import (
    Settlement,
)

log = logging.getLogger("fabric.worker")


class Worker:
    """Runs one :class:`Agent` against the broker. Use as ``async with Worker(agent, settings):``.

    Example:
        >>> async with Worker(agent, load_settings()) as worker:
        ...     await worker.wait_stopped()
    """

    def __init__(
        self,
        agent: Agent,
        settings: FabricSettings,
        *,
        policy: FailurePolicy | None = None,
        concurrency: int | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not agent.handlers:
            raise ValueError(f"agent {agent.name!r} has no handlers: register some with @agent.handler(...)")
        self.agent = agent
        self.settings = settings
        self.ns = settings.namespace
        self.concurrency = concurrency or settings.worker.concurrency
        self.agent_id = settings.worker.agent_id or f"{agent.name}@{socket.gethostname()}:{os.getpid()}"
        self._policy = policy or RetryPolicy()
        #: Named background tasks: heartbeats, the watchdog, re-scoring, the stop after a fatal error.
        self._background = background.Background()
        self._telemetry = telemetry or Telemetry("fabric-worker")
        self._amqp = AmqpConnection(
            settings.amqp_url.get_secret_value(), name=f"fabric-worker:{self.agent_id}"
        )
        #: This worker's Prometheus metrics (a registry of its own), served at ``/metrics``.
        self.metrics = WorkerMetrics(
            agent.capabilities,
            in_flight=lambda: self.in_flight,
            concurrency=self.concurrency,
            overdue_threads=lambda: self.overdue_threads,
            breakers=lambda: self.consumers.breaker_states(),
            under_lease=lambda: len(self._book.leased()),
        )
        self._amqp.on_confirm = self.metrics.observe_publish
        #: Publishes events and copies of task messages, and settles deliveries in the contract's order.
        self._settle = Settlement(
            self._amqp,
            self.ns,
            self.agent_id,
            telemetry=self._telemetry,
            metrics=self.metrics,
            capabilities=agent.capabilities,
        )
        #: Runs the handlers: concurrency slots, time limits, threads.
        self._execution = Execution(
            self.concurrency,
            self._policy,
            draining=lambda: self._draining,
            is_cancelled=lambda task: self._cancels.covers(task.workflow_id, task.task_id),
        )
        #: Attempts held here from their delivery until they are settled, and those reported (bounded).
        self._book = AttemptsBook()
        self._leases = Leases(settings.worker, self._settle, self._execution, self.metrics)
        #: The capability queues' consumers, their circuit breakers and scores.
        self.consumers = Consumers(
            agent,
            settings,
            self._amqp,
            draining=lambda: self._draining,
            run=lambda handler, delivery: self._pipeline.on_task(handler, delivery),
            give_back=self._settle.return_unstarted,
            on_fatal=self._fatal,
            busy=lambda: min(1.0, (self.in_flight + self.overdue_threads) / self.concurrency),
        )
        self._heartbeats = Heartbeats(
            self._amqp, self.ns, interval_s=settings.worker.heartbeat_interval_s, beat=self._beat
        )
        self._host = socket.gethostname()
        #: Workflows and tasks an operator cancelled: running ones are stopped, copies dropped unrun.
        self._cancels = CancelSync(self._amqp, self.ns, on_cancel=self._execution.stop)
        self._health: HealthServer | None = None
        self._draining = False
        self._started = False
        self._stopped = asyncio.Event()
        #: True when the worker stopped because it could not consume any more (the CLI exits non-zero).
        self.failed_fatally = False
        #: Each delivered task goes through it, in order.
        self._pipeline = Pipeline(
            self.agent_id,
            settings,
            concurrency=self.concurrency,
            policy=self._policy,
            parts=Parts(
                settlement=self._settle,
                execution=self._execution,
                book=self._book,
                leases=self._leases,
                consumers=self.consumers,
                cancels=self._cancels,
                telemetry=self._telemetry,
                metrics=self.metrics,
            ),
        )

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise NotConnectedError("a Worker cannot be started twice; create a new one")
        self._started = True
        try:
            await self._amqp.connect()
            await self._amqp.declare(spec.build(self.ns, self.agent.capabilities))
            # Cancellations are broadcast on {ns}.control: bound before any task is consumed, so none
            # is missed; the ones before are asked of the router (tasks wait for that list).
            await self._cancels.start()
            # One channel, one prefetch for every capability: at most `concurrency` unacked tasks in all,
            # so the tasks this worker cannot start yet stay in their queues for idle workers.
            # Every consumer starts at the top score (no record yet) and moves with its record.
            consumers = await self._amqp.consume_many(
                {
                    names.capability_queue(self.ns, capability): functools.partial(
                        self._pipeline.on_task, self.agent.handlers[capability]
                    )
                    for capability in self.agent.capabilities
                },
                prefetch=self.concurrency,
                channel_wide=True,
                priorities={
                    names.capability_queue(self.ns, capability): scoring.MAX_SCORE
                    for capability in self.agent.capabilities
                },
            )
            self.consumers.subscribed(consumers)
            http = self.settings.http
            # Many workers may share a host: a taken port falls back to a free one (logged).
            self._health = await serve_health(
                http.host,
                http.worker_port,
                checks={"broker": self._check_broker, "consumers": self._check_consumers},
                metrics=self.render_metrics,
                fallback=True,
            )
        except BaseException:
            await self._close()
            raise
        self._background.start(
            "heartbeats",
            self._heartbeats.run(leased=self._renewing, health=self._health_now, each=self._each_beat),
        )
        self._background.start("watchdog", self.consumers.watchdog())
        log.info(
            "worker %s ready: capabilities %s, concurrency %d",
            self.agent_id,
            self.agent.capabilities,
            self.concurrency,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking tasks, let running ones finish (up to the drain timeout), then close.

        Tasks still running at the deadline are left unacked, so the broker gives them to another worker.
        """
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        timeout = self.settings.worker.drain_timeout_s if timeout_s is None else timeout_s
        running = self._pipeline.in_flight
        log.info(
            "worker %s draining: taking no new tasks, waiting up to %.0fs for %d running",
            self.agent_id,
            timeout,
            running,
        )
        for consumer in self.consumers.of.values():
            await consumer.cancel()
        # Tasks received but not started (waiting for a slot) go back to their queues now, unstarted.
        self._execution.stop_waiting()
        pending: set[asyncio.Task[Any]] = set()
        if self._pipeline.running:
            _, pending = await asyncio.wait(self._pipeline.running, timeout=timeout)
            if pending:
                log.warning(
                    "drain deadline passed with %d tasks running; the broker will redeliver them",
                    len(pending),
                )
                for task in pending:
                    task.cancel()
                # Let the cancelled tasks nack their deliveries before the connection closes.
                await asyncio.wait(pending, timeout=1.0)
        if self.overdue_threads:
            log.warning(
                "%d sync handlers are still running past their task; their threads end with the process",
                self.overdue_threads,
            )
        await self._background.stop("heartbeats")
        if not self.failed_fatally:
            # A clean stop says so, or the router would take the silence for a crash (``lost``). A fatal
            # stop stays silent on purpose: ``lost`` and its alert are what an operator should see then.
            await self._heartbeats.final(self.agent_id)
        await self._close()
        if self.failed_fatally:
            log.warning("worker %s stopped after a fatal error", self.agent_id)
        else:
            log.info(
                "worker %s stopped: drained %d tasks%s",
                self.agent_id,
                running - len(pending),
                f" ({len(pending)} left to the broker)" if pending else "",
            )

    async def _close(self) -> None:
        # Closing may run in a background task (the stop after a fatal error): it is not cancelled.
        self.consumers.stop()
        await self._background.stop_all()
        await self._cancels.close()
        if self._health is not None:
            await self._health.__aexit__(None, None, None)
        await self._amqp.close()
        await asyncio.to_thread(self._telemetry.shutdown)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def in_flight(self) -> int:
        return self._pipeline.in_flight

    @property
    def adopted(self) -> int:
        """Copies of attempts held or reported here that arrived again and were not run again."""
        return self._pipeline.adopted

    @property
    def overdue_threads(self) -> int:
        """Sync handlers still running on their threads after their task ended (timed out, cancelled)."""
        return self._execution.overdue_threads

    @property
    def processed(self) -> int:
        """Runs that succeeded."""
        return self._execution.processed

    @property
    def failed(self) -> int:
        """Runs that failed (cancelled ones are not counted)."""
        return self._execution.failed

    @property
    def leased(self) -> int:
        """Attempts handed over to a lease (their message acked while they ran on)."""
        return self._leases.leased

    @property
    def http_port(self) -> int | None:
        return self._health.port if self._health else None

    async def _check_broker(self) -> str | None:
        return None if self._amqp.connected else "broker connection is down"

    async def _check_consumers(self) -> str | None:
        if self._draining:
            return "draining"
        idle = self.consumers.idle()
        return f"not consuming {', '.join(idle)}" if idle else None

    def render_metrics(self) -> str:
        """The Prometheus text exposition served at ``/metrics``."""
        return self.metrics.render()

    def _fatal(self) -> None:
        """The worker cannot consume any more: it stops, in the background (the caller is one of its
        own background tasks, which the stop cancels)."""
        self.failed_fatally = True
        self._background.start("fatal-drain", self.drain())

    # -- heartbeats -------------------------------------------------------------------------------

    def _each_beat(self) -> None:
        # Re-scoring may wait on the broker (basic.cancel + basic.consume): never the heartbeats.
        if not self._draining and not self._background.running("rescore"):
            self._background.start("rescore", self.consumers.rescore())

    def _renewing(self) -> list[Running]:
        """The leased attempts whose leases a heartbeat renews now (a lease that lapsed is given up)."""
        return [running for running in self._book.leased() if self._leases.held(running)]

    def _health_now(self) -> HeartbeatHealth:
        return "draining" if self._draining else "ok"

    def _beat(self, health: HeartbeatHealth, leases: list[Running]) -> Heartbeat:
        """This agent's heartbeat now: ``health`` as given, renewing the leases of ``leases``."""
        return Heartbeat(
            leases=[(r.task.workflow_id, r.task.task_id, r.task.attempt) for r in leases],
            interval_s=self.settings.worker.heartbeat_interval_s,
            agent_id=self.agent_id,
            agent=self.agent.name,
            host=self._host,
            pid=os.getpid(),
            capabilities=self.agent.capabilities,
            concurrency=self.concurrency,
            in_flight=self.in_flight,
            processed=self.processed,
            failed=self.failed,
            health=health,
            breakers=self.consumers.breaker_states(),
            free_since=self._pipeline.free_since,
            consumers=self.consumers.states(),
            at=time.time(),
        )
