"""The router: admits workflows, releases ready tasks, records every state change, answers queries.

Order of durability (what makes "nothing lost, nothing completed twice" hold across a ``kill -9``):

* A submission is acked only after its workflow is stored and its ready tasks are confirmed by the
  broker. Tasks are stored as ``queued`` with ``dispatched=False`` first; after the broker confirms
  their publish they are saved ``dispatched=True``. At start the router publishes every task still
  ``queued`` and undispatched, so a crash between the two writes only duplicates a message, which
  workers tolerate (execution is at-least-once) and the router absorbs (one terminal state per task).
* An event is acked only after the state change it causes is committed in one atomic batch, with the
  dependents it releases marked ``queued`` in the same batch.
* A finished workflow is committed with ``notified=False``; after its ``completed`` document is
  published it is saved ``notified=True``; at start any finished, unnotified workflow is announced.

Long tasks run under a lease: a worker acks the message of a task still running after
``lease_after_s`` (before RabbitMQ's ``consumer_timeout`` closes its channel) once its ``started`` event
with ``lease_s`` is confirmed; from then on the router, not the broker, owns the task's redelivery. The
worker's heartbeats renew the lease; one not renewed within ``lease_s`` lapses, and the router counts the
attempt as lost (``WorkerLost``) and publishes the next one, or parks the task ``worker_lost`` at its
limit. Events of an attempt the router gave up, or of any attempt older than the current one, are
recorded in the task's history and change nothing else.

Every state change is decided by the pure workflow core (:mod:`fabric.router.workflow`): the router
loads the records a decision reads, calls the core, and carries out the changeset it returns in the
order above (:meth:`Router._commit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from fabric.alerts import AlertPublisher
from fabric.errors import (
    NotConnectedError,
    ProtocolError,
    StoreError,
    TopologyMismatch,
    TransportError,
    Unroutable,
)
from fabric.metrics import RouterMetrics
from fabric.protocol import codec, headers
from fabric.protocol.messages import (
    Accepted,
    Alert,
    AlertSeverity,
    ErrorInfo,
    Heartbeat,
    Rejected,
    RejectReason,
    TaskEvent,
    TaskStatus,
)
from fabric.protocol.task_message import TaskMessage
from fabric.router import actions, rpc, why
from fabric.router import workflow as core
from fabric.router.admission import Admitted, Refusal, admit
from fabric.router.agents import Agents, Census
from fabric.router.announce import Announcer
from fabric.router.http import ApiServer, Parts, build_app
from fabric.router.locks import KeyedLocks
from fabric.router.monitoring import MAX_WATCHED_CAPABILITIES, Monitoring
from fabric.router.periodic import Periodic
from fabric.router.recall import cancels_answer
from fabric.router.rpc import Rpc
from fabric.router.rules import ErrorWindow, QueueAges
from fabric.router.workflow import EventVerdict
from fabric.settings import FabricSettings
from fabric.store import StateStore, open_store
from fabric.store.base import Sample, TaskRecord, WorkflowRecord
from fabric.store.timed import timed
from fabric.telemetry import MAX_LINKS, Telemetry, messaging_attributes
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Consumer, Delivery
from fabric.transport.parking import park_as_received

log = logging.getLogger("fabric.router")

_T = TypeVar("_T")

#: Pause before a message whose processing failed on a store or broker error is requeued, so an
#: outage does not turn into a hot redelivery loop.
_REQUEUE_PAUSE_S = 1.0

#: Lease renewals the router remembers at most (one per long task running).
_MAX_LEASES = 100_000
#: Leased tasks one lease check reads at most.
_LEASE_CHECK_BATCH = 10_000

#: Most resubmitting clients a workflow remembers to send its completed document to.
_MAX_SUBSCRIBERS = 16


#: Sends one reply document (``accepted``, ``rejected``, ``completed``) in a content type.
Respond = Callable[[dict[str, Any], str], Awaitable[None]]


async def _no_reply(doc: dict[str, Any], content_type: str) -> None:
    """The submitter asked for no replies."""


@dataclass(frozen=True)
class Submitted:
    """How :meth:`Router.submit` decided: the ``accepted`` or ``rejected`` reply it sent.

    ``resent``: the workflow existed already (an idempotent resend); ``completed``: its completion
    document, when that workflow has finished.
    """

    reply: Accepted | Rejected
    resent: bool = False
    completed: dict[str, Any] | None = None


class Router:
    """The router process's composition root. Use as ``async with Router(settings) as router:``.

    Example:
        >>> async with Router(load_settings()) as router:
        ...     await router.wait_closed()
    """

    def __init__(
        self,
        settings: FabricSettings,
        *,
        store: StateStore | None = None,
        amqp: AmqpConnection | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self._telemetry = telemetry or Telemetry("fabric-router")
        #: This router's Prometheus metrics (a registry of its own), served at ``/metrics``.
        self.metrics = RouterMetrics()
        self.ns = settings.namespace
        self._store = timed(
            store
            or open_store(
                settings.store.url,
                namespace=settings.namespace,
                sqlite_synchronous=settings.store.sqlite_synchronous,
            ),
            self.metrics.observe_store,
        )
        self._owns_store = store is None
        self._amqp = amqp or AmqpConnection(
            settings.amqp_url.get_secret_value(),
            name=f"fabric-router:{settings.namespace}",
            publish_timeout_s=settings.router.publish_timeout_s,
        )
        self._amqp.on_confirm = self.metrics.observe_publish
        #: Capabilities this router has published tasks to (their queue depths are exported).
        self._capabilities: set[str] = set()
        self._consumers: list[Consumer] = []
        self._http: ApiServer | None = None
        #: When this router started (seconds since the epoch).
        self.started_at = time.time()
        self._locks = KeyedLocks()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._event_queue: dict[str, list[tuple[Delivery, TaskEvent]]] = {}
        self._active = False
        #: When each leased attempt was last renewed (its started event, then heartbeats listing it).
        self._lease_renewed: dict[tuple[str, str, int], float] = {}
        #: When this router became the active one: a lease it has not seen renewed yet counts from here.
        self._active_since = 0.0
        self._started = False
        self._closed = asyncio.Event()
        #: Set when the router begins to shut down (the dashboard's live streams end then).
        self.stopping = asyncio.Event()
        self._alerts = AlertPublisher(
            settings.alerts,
            self.ns,
            self._publish_alert,
            source="router",
            publish_timeout_s=settings.router.publish_timeout_s,
        )
        #: Attempt outcomes per capability over the error-rate window (threshold alerts).
        self._error_window = ErrorWindow(settings.alerts.rules.error_rate_window_s)
        #: Tasks dispatched and not started yet, for the queue-age rule.
        self._queue_ages = QueueAges()
        #: Counters of what this router did since start (exposed through RPC ``ping``).
        self.stats: dict[str, int] = {
            "submissions": 0,
            "accepted": 0,
            "rejected": 0,
            "events": 0,
            "dispatched": 0,
            "completed": 0,
        }
        #: Replies, completed documents and task notifications.
        self.announcer = Announcer(
            self._amqp,
            self._store,
            self.ns,
            task_notifications=self.settings.router.task_notifications,
            stats=self.stats,
        )
        self._agents = Agents(
            self._store,
            self._amqp,
            self._alerts,
            namespace=self.ns,
            retention_s=settings.router.agent_retention_s,
            stall_after_s=settings.router.stall_after_s,
        )
        #: Gauges, threshold rules and samples; what the HTTP layer reads of this router.
        self.monitoring = Monitoring(
            settings,
            store=self._store,
            amqp=self._amqp,
            metrics=self.metrics,
            agents=self._agents,
            alerts=self._alerts,
            capabilities=self._capabilities,
            stats=self.stats,
            started_at=self.started_at,
            stopping=self.stopping,
            is_active=lambda: self._active,
            claim_active=self._claim_active,
            error_window=self._error_window,
            queue_ages=self._queue_ages,
        )
        self._loops = self._periodic_loops()
        self.rpc = self._queries()
        self.metrics.counter_from(
            "fabric_alerts",
            "Alerts by what happened to them: fired, resolved, published (to {ns}.alerts), delivered "
            "(webhook POSTs), failed (given up after retries), dropped (a delivery queue was full).",
            lambda: [((event,), count) for event, count in self._alerts.stats.items()],
            ["event"],
        )
        self.metrics.gauge_from(
            "fabric_alerts_firing",
            "Alert conditions firing now (fired and not resolved).",
            lambda: [((), len(self._alerts.firing_keys))],
        )
        self.metrics.gauge_from(
            "fabric_router_messages_in_flight",
            "Submissions and events the router is processing now.",
            lambda: [((), len(self._in_flight))],
        )

    def _periodic_loops(self) -> list[Periodic]:
        """The router's background loops. Those with ``active`` run only on the active router (a
        standby would repeat them): the one meaning of active is :meth:`_claim_active`."""
        every = self.settings.router
        active = self._claim_active
        return [
            # Repair what failed steps left behind.
            Periodic("periodic recovery", self._recover, every.recovery_interval_s, active=active),
            # Every router keeps its /metrics fresh; only the active one checks the rules (inside).
            Periodic("metrics refresh", self.monitoring.refresh, every.metrics_interval_s, at_once=True),
            # Run again every long task whose lease lapsed.
            Periodic("lease check", self._check_leases, every.lease_check_interval_s, active=active),
            Periodic(
                "dashboard sample",
                self.monitoring.take_sample,
                every.sample_interval_s,
                active=active,
                standby=self.monitoring.skip_sample,
                level=logging.DEBUG,
            ),
            # A standby only refreshes its copy of the stall marks, so the heartbeats it records keep them.
            Periodic(
                "stall watchdog",
                self._agents.check_stalls,
                every.stall_check_interval_s,
                active=active,
                standby=self._agents.load_stalls,
                level=logging.WARNING,
            ),
        ]

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise NotConnectedError("a Router cannot be started twice; create a new one")
        self._started = True
        if self._owns_store:
            await self._store.__aenter__()
        try:
            await self._amqp.connect()
            await self._amqp.declare(spec.core(self.ns))
            await self._alerts.__aenter__()
            await self._agents.load_stalls()
            # The capabilities of stored workflows and agents seen: a queue a previous router filled and
            # nobody serves any more is watched (stats, the no_agent alert) before anything is published.
            self._capabilities.update((await self._store.known_capabilities())[:MAX_WATCHED_CAPABILITIES])
            await self._recover()
            prefetch = self.settings.router
            self._consumers = [
                await self._amqp.consume(
                    names.submit_queue(self.ns), self._on_submission, prefetch=prefetch.submit_prefetch
                ),
                await self._amqp.consume(
                    names.events_queue(self.ns), self._on_event, prefetch=prefetch.events_prefetch
                ),
                await self._amqp.consume(names.rpc_queue(self.ns), self.rpc.on_delivery, prefetch=32),
                await self._amqp.consume(names.heartbeats_queue(self.ns), self._on_heartbeat, prefetch=64),
            ]
            http = self.settings.http
            parts = Parts(
                self.settings, intake=self, operator=self, monitoring=self.monitoring, store=self._store
            )
            app = build_app(
                parts,
                checks={
                    "broker": self._check_broker,
                    "consumers": self._check_consumers,
                    "store": self._check_store,
                },
                metrics=self.render_metrics,
            )
            self._http = await ApiServer(app, http.host, http.port).__aenter__()
        except BaseException:
            await self._shutdown()
            raise
        for loop in self._loops:
            loop.start()
        self._background(self.announcer.note_sender(), "task notifications")
        log.info("router ready (namespace %s, store %s)", self.ns, self.settings.store.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self.stopping.set()
        for loop in self._loops:
            await loop.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.__aexit__(None, None, None)
        for consumer in self._consumers:
            await consumer.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=10)
        await self._alerts.close()
        await self._amqp.close()
        if self._owns_store:
            await self._store.__aexit__(None, None, None)
        await asyncio.to_thread(self._telemetry.shutdown)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def store(self) -> StateStore:
        return self._store

    @property
    def alerts(self) -> AlertPublisher:
        """The router's alerts (escalations, and any rule that fires through it)."""
        return self._alerts

    async def _publish_alert(self, routing_key: str, body: bytes) -> None:
        # Not mandatory: nobody binding a queue to {ns}.alerts is a choice, not a fault.
        await self._amqp.publish(
            names.alerts_exchange(self.ns), routing_key, body, content_type=codec.JSON, mandatory=False
        )

    @property
    def http_port(self) -> int | None:
        """The port of the HTTP API and health endpoints (useful when configured as 0)."""
        return self._http.port if self._http else None

    @property
    def active(self) -> bool:
        """True once this router consumes submissions or events (the others are standbys)."""
        return self._active

    async def _check_broker(self) -> str | None:
        return None if self._amqp.connected else "broker connection is down"

    async def _check_consumers(self) -> str | None:
        idle = [c.queue_name for c in self._consumers if not c.healthy]
        return f"not consuming {', '.join(idle)}" if idle else None

    async def _check_store(self) -> str | None:
        await self._store.ping()
        return None

    def render_metrics(self) -> str:
        """The Prometheus text exposition served at ``/metrics`` (any HTTP server may call it)."""
        return self.metrics.render()

    async def _claim_active(self) -> bool:
        """True when this router is the active one. A router that is the only consumer of
        ``{ns}.router.events`` is the active one even before its first delivery: a router restarted
        into an idle fabric gets no delivery that would tell it, yet work stuck in a queue must still
        alert, stalled agents must still be found and lapsed leases must still run again."""
        if not self._active and await self._sole_router():
            self._became_active()
        return self._active

    async def refresh_gauges(self) -> Census:
        """Read the agents and the queue depths into the gauges ``/metrics`` shows (see
        :meth:`Monitoring.refresh_gauges`)."""
        return await self.monitoring.refresh_gauges()

    async def check_alert_rules(self, now: float | None = None) -> None:
        """Evaluate the threshold rules now (see :meth:`Monitoring.check_alert_rules`)."""
        await self.monitoring.check_alert_rules(now)

    async def take_sample(self) -> Sample:
        """Store one sample of the dashboard's time series (see :meth:`Monitoring.take_sample`)."""
        return await self.monitoring.take_sample()

    async def check_stalls(self, now: float | None = None) -> None:
        """One pass of the stall watchdog (see :meth:`Agents.check_stalls`)."""
        await self._agents.check_stalls(now)

    # -- recovery ---------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Publish tasks stored as ready but never confirmed; announce finished, unannounced workflows.

        Runs at start, when this router becomes the active one, periodically while it is active, and
        never stops start-up: a workflow it cannot repair now is logged and tried again next time.
        """
        republished = announced = 0
        attempted: set[tuple[str, str]] = set()
        # Tasks stored after the pass began are being dispatched on the normal path; under steady load
        # there are always some, and a pass taking them in would never end (nor reach the announcing
        # below) while its set of attempted keys grew with every task admitted (issue 6, S5).
        began = time.time()
        while True:
            batch = [
                t
                for t in await self._store.undispatched(limit=500)
                if t.key not in attempted and t.created_at < began
            ]
            if not batch:
                break
            attempted.update(t.key for t in batch)
            for workflow_id in dict.fromkeys(t.workflow_id for t in batch):
                try:
                    republished += await self._reconcile(workflow_id, announce=False)
                except Exception as exc:
                    log.error("recovery of workflow %s failed (will try again): %s", workflow_id, exc)
        seen: set[str] = set()
        while True:
            finished = [w for w in await self._store.unnotified(limit=500) if w.workflow_id not in seen]
            if not finished:
                break
            for workflow in finished:
                seen.add(workflow.workflow_id)
                try:
                    async with self._locks.hold(workflow.workflow_id):
                        current = await self._store.get_workflow(workflow.workflow_id)
                        if current is not None and current.status.terminal and not current.notified:
                            await self._announce(current)
                            announced += 1
                except Exception as exc:
                    log.error("announcing workflow %s failed (will try again): %s", workflow.workflow_id, exc)
        if republished or announced:
            log.info(
                "recovery: published %d pending tasks, announced %d finished workflows",
                republished,
                announced,
            )

    async def _reconcile(self, workflow_id: str, *, announce: bool = True, locked: bool = False) -> int:
        """Finish what a failed or interrupted step left undone for one workflow: publish its ready,
        unconfirmed tasks and announce it if it finished unannounced. Returns the tasks published.

        ``locked``: the caller already holds the workflow's lock.
        """
        if not locked:
            async with self._locks.hold(workflow_id):
                return await self._reconcile(workflow_id, announce=announce, locked=True)
        tasks = await self._store.get_tasks(workflow_id)
        pending = [t for t in tasks.values() if t.status is TaskStatus.QUEUED and not t.dispatched]
        ended = await self._commit(core.Changeset(workflow_id, tasks, released=pending))
        if ended is not None:
            await self._announce(ended)
        if announce:
            workflow = await self._store.get_workflow(workflow_id)
            if workflow is not None and workflow.status.terminal and not workflow.notified:
                await self._announce(workflow)
        return len(pending)

    async def _sole_router(self) -> bool:
        """True when this router is the only consumer of the events queue (so the active one)."""
        consumer = next((c for c in self._consumers if c.queue_name == names.events_queue(self.ns)), None)
        if consumer is None or not consumer.healthy:
            return False
        info = await self._amqp.queue_info(names.events_queue(self.ns))
        return info is not None and info.consumers == 1

    async def _check_leases(self, now: float | None = None) -> int:
        """Give up every leased attempt not renewed within its ``lease_s``; returns how many."""
        now = time.time() if now is None else now
        leased = await self._store.leased(limit=_LEASE_CHECK_BATCH)
        live: set[tuple[str, str, int]] = set()
        lapsed: list[TaskRecord] = []
        for task in leased:
            key = (task.workflow_id, task.task_id, task.attempts)
            live.add(key)
            renewed = max(self._lease_renewed.get(key, 0.0), self._active_since)
            if lease_lapsed(renewed, task.lease_s, now):
                lapsed.append(task)
        if len(leased) < _LEASE_CHECK_BATCH:
            # Every leased task was read: a renewal of anything else belongs to an attempt that ended.
            for key in [k for k in self._lease_renewed if k not in live]:
                del self._lease_renewed[key]
        given_up = 0
        for task in lapsed:
            try:
                given_up += await self._lapse(task.workflow_id, task.task_id, task.attempts, now)
            except Exception as exc:
                log.error("lapsed lease of %s/%s not handled (will try again): %s", *task.key, exc)
        return given_up

    def _renew_leases(self, keys: Iterable[tuple[str, str, int]], now: float) -> None:
        """Remember that the leases of these attempts were renewed at ``now``."""
        renewed = self._lease_renewed
        for key in keys:
            renewed.pop(key, None)  # re-inserted last: the map runs from least to most recently renewed
            renewed[key] = now
        while len(renewed) > _MAX_LEASES:
            # Bounded: forget the renewal heard longest ago (a live lease is renewed every heartbeat,
            # so it is never the oldest while fewer than _MAX_LEASES leases are live).
            del renewed[next(iter(renewed))]

    async def _lapse(self, workflow_id: str, task_id: str, attempt: int, now: float) -> int:
        """The lease of ``attempt`` lapsed: count it lost; publish the next attempt or park the task."""
        async with self._locks.hold(workflow_id):
            changes, lapsed = await self._decide(
                workflow_id, lambda changes: core.lapse(changes, task_id, attempt, now), [task_id]
            )
            if not lapsed:
                return 0  # an event overtook the check
            self._lease_renewed.pop((workflow_id, task_id, attempt), None)
            ended = await self._commit(changes)
            if ended is not None:
                await self._announce(ended)
            return 1

    async def _park_task(self, park: core.Park, known: Mapping[str, TaskRecord]) -> None:
        """Publish the task message of ``park.attempt`` to ``{ns}.dead`` (confirmed), marked parked by
        ``park.agent``."""
        task = park.task
        upstream_tasks = {d: known[d] for d in task.depends_on if d in known}
        missing = [d for d in task.depends_on if d not in known]
        if missing:
            upstream_tasks.update(await self._store.get_tasks(task.workflow_id, missing))
        upstream = {d: upstream_tasks[d].result for d in task.depends_on if d in upstream_tasks}
        parked = self._task_message(task, upstream, park.attempt).parked(
            reason=park.reason,
            last_error=f"{park.error.type}: {park.error.message}",
            routing_key=task.capability,
            agent_id=park.agent,
            now_ms=headers.now_ms(),
        )
        await self._amqp.publish(
            names.dead_exchange(self.ns), task.capability, parked.body, **parked.properties()
        )

    def _became_active(self) -> None:
        """The first submission or event proves this router is the active one (single active consumer):
        a standby that just took over repairs what its predecessor left."""
        if self._active:
            return
        self._active = True
        self._active_since = time.time()
        self._background(self._recover(), "recovery on becoming active")

    def _background(self, coro: Any, what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:
                log.error("%s failed: %s", what, exc)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Cancelled before it ever ran (a router closed at once): close the coroutine, unawaited.
        task.add_done_callback(lambda _: coro.close())

    # -- submissions ------------------------------------------------------------------------------

    def count_submission(self) -> None:
        """Count one submission received, on AMQP or HTTP (the ``submissions`` counter of ``/stats``)."""
        self.stats["submissions"] += 1

    async def _on_submission(self, delivery: Delivery) -> None:
        self.count_submission()
        self._became_active()
        destination = names.submit_queue(self.ns)
        with self._telemetry.span(
            f"process {destination}",
            SpanKind.CONSUMER,
            messaging_attributes(destination, "process", message_id=delivery.message_id),
            parent=self._telemetry.extract(delivery.headers),
        ):
            await self._guarded(delivery, self._submission(delivery), reply_on_bug=True)

    async def _submission(self, delivery: Delivery) -> None:
        async def respond(doc: dict[str, Any], content_type: str) -> None:
            await self.announcer.reply(delivery.reply_to, delivery.correlation_id, doc, content_type)

        await self.submit(
            delivery.body,
            delivery.content_type,
            message_id=delivery.message_id,
            reply_to=delivery.reply_to,
            correlation_id=delivery.correlation_id,
            respond=respond,
            notify_tasks=headers.get_bool(delivery.headers, headers.NOTIFY_TASKS),
        )
        await delivery.ack()

    async def submit(
        self,
        body: bytes,
        content_type: str | None,
        *,
        message_id: str | None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        respond: Respond | None = None,
        notify_tasks: bool = False,
    ) -> Submitted:
        """Admit a submission: the one path of AMQP (``{ns}.submit``) and HTTP (``POST /api/v1/workflows``).

        Validation, rejection codes and idempotency are those of docs/protocol.md §2-3. An accepted
        workflow is stored and its ready tasks are confirmed by the broker before this returns (or
        ``respond`` is called). ``respond(document, content_type)`` sends each reply document in order:
        the ``accepted`` or ``rejected`` reply, then, for a resend of a finished workflow, its ``completed``
        document; it is called under the workflow's lock, so no ``completed`` announcement can overtake
        the ``accepted`` reply. ``notify_tasks`` asks for task notifications (a resend can ask too).

        Raises:
            StoreError, TransportError: nothing was decided; the caller asks again (same message id).
        """
        respond = respond or _no_reply
        router = self.settings.router
        try:
            admitted = admit(
                body,
                content_type,
                message_id=message_id,
                reply_to=reply_to,
                correlation_id=correlation_id,
                max_body_bytes=router.max_body_bytes,
                max_tasks=router.max_tasks,
                default_max_attempts=router.default_max_attempts,
                policy=self.settings.policy,
            )
        except Refusal as refusal:
            reply_type = codec.normalize_content_type(content_type) or codec.JSON
            return await self._refuse(message_id, refusal, respond, reply_type)
        admitted.workflow.notify_tasks = notify_tasks
        return await self._accept(admitted, respond)

    async def _refuse(
        self, message_id: str | None, refusal: Refusal, respond: Respond, reply_type: str
    ) -> Submitted:
        self.stats["rejected"] += 1
        self.metrics.rejected(str(refusal.reason))
        log.info("rejected submission %s: %s: %s", message_id, refusal.reason, refusal.detail)
        reply = Rejected(
            workflow_id=refusal.workflow_id,
            reason=refusal.reason,
            detail=refusal.detail,
            errors=list(refusal.errors),
        )
        await respond(reply.model_dump(mode="json"), reply_type)
        return Submitted(reply)

    async def _accept(self, admitted: Admitted, respond: Respond) -> Submitted:
        workflow = admitted.workflow
        span = trace.get_current_span()
        span.set_attribute("fabric.workflow.id", workflow.workflow_id)
        context = span.get_span_context()
        if context.is_valid:
            workflow.trace_id = format(context.trace_id, "032x")
        # The submission's span is the root of the workflow's trace: kept, so that tasks published
        # later (recovery, replay, resume) stay in the trace.
        workflow.traceparent = self._telemetry.current()
        async with self._locks.hold(workflow.workflow_id):
            existing = await self._store.insert_workflow(workflow, admitted.tasks)
            if existing is not None:
                return await self._resubmitted(workflow, existing, respond)
            self.announcer.remember_flag(workflow)
            self.metrics.workflow_submitted()
            for task in admitted.tasks:
                self.metrics.count_task("submitted", task.capability)
            ended = await self._commit(
                core.Changeset(workflow.workflow_id, workflow=workflow, released=list(admitted.ready))
            )
            self.stats["accepted"] += 1
            accepted = Accepted(workflow_id=workflow.workflow_id, tasks=workflow.task_count)
            await respond(accepted.model_dump(mode="json"), workflow.content_type)
            if ended is not None:
                # Every ready task failed undeliverable: the completed document follows the reply.
                await self._announce(ended)
        return Submitted(accepted)

    async def _resubmitted(
        self, new: WorkflowRecord, existing: WorkflowRecord, respond: Respond
    ) -> Submitted:
        """The workflow id is taken: the same body gets the same answer, another body a conflict."""
        if existing.fingerprint != new.fingerprint:
            refusal = Refusal(
                RejectReason.CONFLICT,
                f"workflow {existing.workflow_id!r} already exists with a different body",
                existing.workflow_id,
            )
            return await self._refuse(new.message_id, refusal, respond, new.content_type)
        # A resend: perhaps the router died after storing it but before dispatching everything.
        await self._reconcile(existing.workflow_id, announce=False, locked=True)
        subscriber = [new.reply_to or "", new.correlation_id or ""]
        changed = False
        if (
            not existing.status.terminal
            and new.reply_to
            and new.reply_to != existing.reply_to
            and subscriber not in existing.subscribers
            and len(existing.subscribers) < _MAX_SUBSCRIBERS
        ):
            # This client waits too: it gets the completed document when the workflow finishes.
            existing.subscribers.append(subscriber)
            changed = True
        if new.notify_tasks and not existing.notify_tasks and not existing.status.terminal:
            existing.notify_tasks = changed = True
        if changed:
            await self._store.save(workflows=[existing])
        self.announcer.remember_flag(existing)
        accepted = Accepted(workflow_id=existing.workflow_id, tasks=existing.task_count)
        await respond(accepted.model_dump(mode="json"), new.content_type)
        completed = None
        if existing.status.terminal:
            completed = await self.announcer.completion_document(existing)
            await respond(completed, new.content_type)
        return Submitted(accepted, resent=True, completed=completed)

    # -- dispatch ---------------------------------------------------------------------------------

    async def _dispatch(
        self,
        tasks: Iterable[TaskRecord],
        *,
        known: Mapping[str, TaskRecord] | None = None,
        workflow: WorkflowRecord | None = None,
    ) -> tuple[list[tuple[TaskRecord, str]], BaseException | None]:
        """Publish ready tasks (confirmed, pipelined), then flag them dispatched.

        With tracing, each publish span hangs under the attempt that released its task (or, for a task
        ready at submission, the workflow's root) and the message carries the spans of the task's other
        dependencies and of its previous attempt, for its attempt span to link to.

        Returns the tasks that cannot be delivered, each with why (its capability queue exists with
        other arguments: :meth:`_commit` fails them instead of blocking their workflow), and the first
        other publish failure, which the caller raises once those are failed, so the message that caused
        this is redelivered (or recovery retries); nothing already confirmed is published twice.
        """
        tasks = list(tasks)
        if not tasks:
            return [], None
        undeliverable: dict[str, TopologyMismatch] = {}
        for capability in dict.fromkeys(t.capability for t in tasks):
            try:
                await self._amqp.declare(spec.capability(self.ns, capability))
            except TopologyMismatch as exc:
                undeliverable[capability] = exc
            else:
                self._capabilities.add(capability)
        deliverable = [t for t in tasks if t.capability not in undeliverable]
        workflow_id = tasks[0].workflow_id
        upstream_ids = {dep for t in deliverable for dep in t.depends_on}
        upstream = {i: known[i] for i in upstream_ids if i in known} if known else {}
        missing = upstream_ids - upstream.keys()
        if missing:
            upstream.update(await self._store.get_tasks(workflow_id, missing))
        root: str | None = None
        if self._telemetry.enabled and any(t.release is None for t in deliverable):
            if workflow is None:
                workflow = await self._store.get_workflow(workflow_id)
            root = workflow.traceparent if workflow is not None else None
        outcomes = await asyncio.gather(
            *(
                self._publish_task(
                    t,
                    {d: upstream[d].result for d in t.depends_on if d in upstream},
                    t.release or root,
                    {
                        d: span
                        for d in t.depends_on
                        if d in upstream and (span := upstream[d].span) and span != t.release
                    }
                    if self._telemetry.enabled
                    else None,
                )
                for t in deliverable
            ),
            return_exceptions=True,
        )
        confirmed = [t for t, outcome in zip(deliverable, outcomes, strict=True) if outcome is None]
        now = time.time()
        for task in confirmed:
            task.dispatched = True
            self._queue_ages.ready(task.capability, task.key, at=now)
        await self._store.mark_dispatched([t.key for t in confirmed])
        self.stats["dispatched"] += len(confirmed)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        return (
            [(t, str(undeliverable[t.capability])) for t in tasks if t.capability in undeliverable],
            failures[0] if failures else None,
        )

    async def _publish_task(
        self,
        task: TaskRecord,
        upstream: dict[str, Any],
        parent: str | None = None,
        links: dict[str, str] | None = None,
    ) -> None:
        """Publish one task message; ``parent`` is the traceparent its publish span hangs under and
        ``links`` the spans of its other dependencies (by task id), both only with tracing."""
        destination = names.tasks_exchange(self.ns)
        attributes = messaging_attributes(
            destination,
            "publish",
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=task.attempts + 1,
        )
        with self._telemetry.span(
            f"publish {destination}", SpanKind.PRODUCER, attributes, parent=self._telemetry.context(parent)
        ):
            await self._publish_task_message(task, upstream, links)

    @staticmethod
    def _task_message(task: TaskRecord, upstream: dict[str, Any], attempt: int) -> TaskMessage:
        """The task message of ``attempt`` (docs/protocol.md §4)."""
        return TaskMessage.new(
            workflow_id=task.workflow_id,
            task_id=task.task_id,
            attempt=attempt,
            max_attempts=task.max_attempts,
            on_exhausted=task.on_exhausted,
            timeout_s=task.timeout_s,
            input=task.input,
            upstream=upstream,
            priority=task.priority,
            dispatched_at_ms=headers.now_ms(),
        )

    async def _publish_task_message(
        self, task: TaskRecord, upstream: dict[str, Any], links: dict[str, str] | None = None
    ) -> None:
        message = self._task_message(task, upstream, task.attempts + 1)
        if self._telemetry.enabled:
            context: dict[str, Any] = {}
            self._telemetry.inject(context)
            message = message.traced(
                context,
                links=dict(list(links.items())[:MAX_LINKS]) if links else None,
                previous_attempt=task.span,  # a replay or resume: the attempt before it
            )
        exchange = names.tasks_exchange(self.ns)
        try:
            await self._amqp.publish(exchange, task.capability, message.body, **message.properties())
        except Unroutable:
            # Someone deleted the capability queue since we declared it: declare it again and retry once.
            log.warning(
                "task %s/%s was unroutable; declaring %s again",
                task.workflow_id,
                task.task_id,
                task.capability,
            )
            await self._amqp.forget(spec.capability(self.ns, task.capability))
            await self._amqp.declare(spec.capability(self.ns, task.capability))
            await self._amqp.publish(exchange, task.capability, message.body, **message.properties())

    # -- events -----------------------------------------------------------------------------------

    async def _on_event(self, delivery: Delivery) -> None:
        self.stats["events"] += 1
        self._became_active()
        try:
            event = TaskEvent.model_validate(
                codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
            )
        except (ProtocolError, ValidationError) as exc:
            await self._park(delivery, "malformed_event", str(exc))
            return
        # Events of one workflow are applied in batches: whoever gets the workflow's lock takes every
        # event queued for it meanwhile, loads the records they touch once, and commits them together.
        self._event_queue.setdefault(event.workflow_id, []).append((delivery, event))
        with self._tracked():
            async with self._locks.hold(event.workflow_id):
                batch = self._event_queue.pop(event.workflow_id, [])
                if batch:
                    await self._apply_batch(event.workflow_id, batch)

    async def _apply_batch(self, workflow_id: str, batch: list[tuple[Delivery, TaskEvent]]) -> None:
        """Record a batch of events; settle every delivery in it exactly once."""
        try:
            changes, verdicts = await self._decide(
                workflow_id,
                functools.partial(self._apply_events, batch, time.time()),
                loader=functools.partial(self._load_for_events, workflow_id, [e for _, e in batch]),
            )
            ended = await self._commit(changes)
        except (StoreError, TransportError) as exc:
            log.warning(
                "could not record %d events of %s (%s); requeueing them", len(batch), workflow_id, exc
            )
            await asyncio.sleep(_REQUEUE_PAUSE_S)
            for delivery, _ in batch:
                await delivery.nack(requeue=True)
            return
        except Exception:
            if len(batch) > 1:
                # One bad event must not park its neighbours: apply them one by one.
                for item in batch:
                    await self._apply_batch(workflow_id, [item])
                return
            delivery, _ = batch[0]
            log.critical("router failed on event %s; parking it", delivery.message_id, exc_info=True)
            await self._park(delivery, "router_error", "".join(traceback.format_exc(limit=3)))
            return
        reconcile = False
        for (delivery, event), verdict in zip(batch, verdicts, strict=True):
            if verdict is EventVerdict.UNKNOWN:
                # Not acked into silence: a store that lost the workflow (or another fabric's event)
                # is something an operator must see.
                await self._park(
                    delivery,
                    "unknown_task",
                    f"no task {event.workflow_id}/{event.task_id} in the state store",
                )
            else:
                reconcile = reconcile or verdict is EventVerdict.RECONCILE
                await delivery.ack()
        if reconcile:
            await self._reconcile(workflow_id, locked=True)
        if ended is not None:
            await self._announce(ended)

    def _apply_events(
        self, batch: list[tuple[Delivery, TaskEvent]], now: float, changes: core.Changeset
    ) -> list[EventVerdict]:
        """The core's verdicts on a batch of events (with tracing, each event carries its attempt's span)."""
        return [
            core.apply_event(
                changes,
                event,
                redelivered=delivery.redelivered,
                span=self._telemetry.traceparent(delivery.headers),
                now=now,
            )
            for delivery, event in batch
        ]

    async def _load_for_events(self, workflow_id: str, events: list[TaskEvent]) -> core.Changeset:
        """The records applying ``events`` reads: their tasks, and what :func:`core.needs` says (the
        workflow and the dependents of a task that may end, or every task when the batch may end the
        workflow)."""
        ids = list(dict.fromkeys(e.task_id for e in events))
        tasks = await self._store.get_tasks(workflow_id, ids)
        needs = core.needs(events, tasks)
        record = await self._workflow_record(workflow_id) if needs.workflow else None
        if record is not None and core.may_finish(events, record):
            # Every task, for closing the workflow; read again only when the batch's own are not all
            # (a one-task workflow's event has loaded its every task already).
            every = tasks if len(tasks) == record.task_count else await self._store.get_tasks(workflow_id)
            return core.Changeset(workflow_id, every, record, complete=True)
        absent = set(ids) - tasks.keys()
        more = [i for i in needs.ids if i not in tasks and i not in absent]
        if more:
            found = await self._store.get_tasks(workflow_id, more)
            absent.update(i for i in more if i not in found)
            tasks.update(found)
        return core.Changeset(workflow_id, tasks, record, absent=absent)

    async def _load(
        self, workflow_id: str, ids: Iterable[str] = (), *, everything: bool = False
    ) -> core.Changeset:
        """A changeset of the workflow's records: ``ids`` only (and the workflow record when
        ``everything`` is False), or every task and the workflow record."""
        if everything:
            tasks = await self._store.get_tasks(workflow_id)
            return core.Changeset(workflow_id, tasks, await self._workflow_record(workflow_id), complete=True)
        wanted = list(dict.fromkeys(ids))
        tasks = await self._store.get_tasks(workflow_id, wanted) if wanted else {}
        return core.Changeset(workflow_id, tasks, absent=set(wanted) - tasks.keys())

    async def _workflow_record(self, workflow_id: str) -> WorkflowRecord:
        workflow = await self._store.get_workflow(workflow_id)
        if workflow is None:
            raise StoreError(f"workflow {workflow_id} has tasks but no workflow record")
        return workflow

    async def _decide(
        self,
        workflow_id: str,
        decide: Callable[[core.Changeset], _T],
        ids: Iterable[str] = (),
        *,
        loader: Callable[[], Awaitable[core.Changeset]] | None = None,
    ) -> tuple[core.Changeset, _T]:
        """Load what a decision reads (``ids``, or what ``loader`` loads), decide; a decision that needs
        more (:class:`core.Incomplete`) is taken again on every record of the workflow, freshly read."""
        changes = await (loader() if loader is not None else self._load(workflow_id, ids))
        try:
            return changes, decide(changes)
        except core.Incomplete:
            changes = await self._load(workflow_id, everything=True)
            return changes, decide(changes)

    async def _commit(self, changes: core.Changeset) -> core.Changeset | None:
        """Carry out a decision in the durability order: park the copies it parks and remember the
        leases it renewed, save its records in one atomic batch, then move its counters, broadcast the
        cancels it recalls and publish the tasks it released (both confirmed), send its task
        notifications (best effort) and fire or resolve its alerts.

        A released task the broker cannot take (its capability queue exists with other arguments) ends
        ``failed`` in a changeset of its own, committed in turn: a loop, never a recursion. Returns the
        last committed changeset that ended its workflow, for the caller to announce once it has settled
        what must come first (the event acks, the ``accepted`` reply), or None.
        """
        ended: core.Changeset | None = None
        failure: BaseException | None = None
        pending = deque([changes])
        while pending:
            current = pending.popleft()
            for park in current.parked:
                await self._park_task(park, current.tasks)
            if current.renewed:
                self._renew_leases(current.renewed, time.time())
            if current.dirty:
                workflows = (
                    [current.workflow] if current.workflow is not None and current.workflow_changed else []
                )
                await self._store.save(workflows=workflows, tasks=list(current.changed.values()))
                self._count(current)
            for key, capability, ready_at in current.queue_ages:
                if ready_at is None:
                    self._queue_ages.left(key)
                else:
                    self._queue_ages.ready(capability, key, at=ready_at)
            if current.recalled:
                await self._broadcast_cancel(current.workflow_id, sorted(set(current.recalled)))
            undeliverable, error = await self._dispatch(
                current.released, known=current.tasks, workflow=current.workflow
            )
            for task, message in undeliverable:
                log.error("task %s/%s failed: TopologyMismatch: %s", task.workflow_id, task.task_id, message)
                failed = await self._load(task.workflow_id, everything=True)
                error_info = ErrorInfo(type="TopologyMismatch", message=message)
                core.fail(failed, failed.tasks.get(task.task_id, task), error_info, time.time())
                pending.append(failed)
            if error is not None:
                failure = failure or error
                continue  # its events are redelivered (or recovery publishes): their effects come then
            await self.announcer.send_notes(current.workflow_id, current.workflow, current.notes)
            for task in current.escalated:
                self._alert_escalated(task)
            for resolved in current.resolved:
                self._alerts.resolve(
                    _escalation_key(current.workflow_id, resolved.task_id), summary=resolved.summary
                )
            if current.announce:
                ended = current
        if failure is not None:
            raise failure
        return ended

    def _count(self, changes: core.Changeset) -> None:
        """Move the counters of a committed changeset (once: a batch that failed to commit counts
        nothing, and its redelivered events count then)."""
        now = time.time()
        for counter, capability in changes.counts:
            self.metrics.count_task(counter, capability)
            if counter in _ATTEMPT_OUTCOMES:
                self._error_window.observe(capability, failed=counter != "succeeded", now=now)
        changes.counts.clear()
        workflow = changes.workflow
        if changes.finished and workflow is not None and workflow.finished_at is not None:
            self.metrics.workflow_finished(str(workflow.status), workflow.finished_at - workflow.created_at)
            changes.finished = False

    # -- announcements ----------------------------------------------------------------------------

    async def _announce(self, ended: WorkflowRecord | core.Changeset) -> None:
        """Announce a finished workflow (:meth:`Announcer.announce`): a stored record, or the committed
        changeset that ended it (closing a workflow reads every task: its document needs no read)."""
        if isinstance(ended, core.Changeset):
            await self.announcer.announce(ended.the_workflow(), ended.tasks if ended.complete else None)
        else:
            await self.announcer.announce(ended)

    # -- queries ----------------------------------------------------------------------------------

    def _queries(self) -> Rpc:
        """The queries answered on ``{ns}.rpc``, by routing key (docs/protocol.md §7)."""
        return Rpc(
            self._store.get_workflow,
            handlers={
                "ping": lambda _: self._ping(),
                "agents": lambda _: self.agents(),
                "cancelled": self._cancels,
            },
            about_workflow={
                "status": lambda workflow, _: self.status_document(workflow),
                "result": lambda workflow, _: self._result(workflow),
                "why": lambda workflow, request: self._why(workflow, rpc.optional(request, "task_id")),
                "cancel": lambda workflow, request: self._cancel(workflow, rpc.optional(request, "task_id")),
                "replay": lambda workflow, request: self._replay(workflow, rpc.param(request, "task_id")),
                "resume": lambda workflow, request: self._resume(
                    workflow, rpc.required(request, "task_id"), request
                ),
                "abort": lambda workflow, request: self._abort(
                    workflow, rpc.required(request, "task_id"), rpc.optional(request, "reason")
                ),
            },
            reply=self.announcer.reply,
        )

    async def _ping(self) -> dict[str, Any]:
        return {"namespace": self.ns, "stats": dict(self.stats)}

    async def _result(self, workflow: WorkflowRecord) -> dict[str, Any]:
        """The workflow's ``completed`` document, or ``{"kind": "running", …}`` while it runs."""
        if not workflow.status.terminal:
            return {"kind": "running", "workflow_id": workflow.workflow_id, "status": str(workflow.status)}
        return await self.announcer.completion_document(workflow)

    async def _replay(self, workflow: WorkflowRecord, task_id: str) -> dict[str, Any]:
        """Run a dead or failed task again from its first attempt (an operator's ``fabric dead replay``).

        Its dependents that never ran because of it wait again, and a finished workflow runs again
        (it will announce its new completion). The replay is kept in the task's history.
        """
        async with self._locks.hold(workflow.workflow_id):
            changes = await self._load(workflow.workflow_id, everything=True)
            revived = actions.replay(changes, task_id, time.time())
            await self._commit(changes)
        log.warning("replayed task %s/%s (%d tasks revived)", workflow.workflow_id, task_id, len(revived))
        return {"workflow_id": workflow.workflow_id, "task_id": task_id, "revived": revived}

    # -- escalation -------------------------------------------------------------------------------

    def _alert_escalated(self, task: TaskRecord) -> None:
        """Fire the ``task.escalated`` alert of a task that now waits for an operator (once)."""
        escalation = task.escalation or {}
        error = escalation.get("error") or {}
        reason = str(escalation.get("reason") or "requested")
        ref = f"{task.workflow_id} --task {task.task_id}"
        self._alerts.fire(
            _escalation_key(task.workflow_id, task.task_id),
            kind="task.escalated",
            severity=AlertSeverity.CRITICAL,
            summary=f"task {task.workflow_id}/{task.task_id} ({task.capability}) needs an operator: {reason}",
            detail=(
                f"attempt {escalation.get('attempt')} on {escalation.get('agent')} ended "
                f"{error.get('type')}: {error.get('message')}. The workflow waits. "
                f"Run it again with `fabric resume {ref} [--input FILE]`, "
                f"or give up with `fabric abort {ref} [--reason TEXT]`."
            ),
            labels={
                "workflow_id": task.workflow_id,
                "task_id": task.task_id,
                "capability": task.capability,
                "reason": reason,
                "agent_id": str(escalation.get("agent") or ""),
            },
            data={
                "attempt": escalation.get("attempt"),
                "max_attempts": task.max_attempts,
                "error": error or None,
            },
        )

    async def _resume(
        self, workflow: WorkflowRecord, task_id: str, request: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Run an escalated task again with a fresh attempt budget (an operator's ``fabric resume``),
        optionally with a new input. The resume, and the new input, are kept in the task's history."""
        new_input = "input" in request
        if new_input and len(codec.encode(request["input"])) > self.settings.router.max_body_bytes:
            raise ProtocolError(
                f"the new input is larger than FABRIC_ROUTER__MAX_BODY_BYTES "
                f"({self.settings.router.max_body_bytes} bytes)"
            )
        async with self._locks.hold(workflow.workflow_id):
            changes = await self._load(workflow.workflow_id, [task_id])
            actions.resume(
                changes, task_id, time.time(), request["input"] if new_input else actions.KEEP_INPUT
            )
            await self._commit(changes)
        log.warning(
            "resumed escalated task %s/%s%s", workflow.workflow_id, task_id, " with a new input" * new_input
        )
        return {
            "workflow_id": workflow.workflow_id,
            "task_id": task_id,
            "status": str(TaskStatus.QUEUED),
            "new_input": new_input,
        }

    async def _abort(self, workflow: WorkflowRecord, task_id: str, reason: str | None) -> dict[str, Any]:
        """End an escalated task ``dead`` with the operator's reason (``fabric abort``): a copy is parked
        on ``{ns}.dead`` (so ``fabric dead replay`` can run it again), its dependents end
        ``upstream_failed`` and the workflow ends ``failed`` when nothing else remains."""
        reason = (reason or "aborted by an operator")[:1000]
        async with self._locks.hold(workflow.workflow_id):
            changes = await self._load(workflow.workflow_id, everything=True)
            actions.abort(changes, task_id, reason, time.time())
            # The parked copy first: a failure there leaves the task escalated, to be aborted again.
            ended = await self._commit(changes)
            if ended is not None:
                await self._announce(ended)
        log.warning("aborted escalated task %s/%s: %s", workflow.workflow_id, task_id, reason)
        skipped = sorted(
            t.task_id for t in changes.changed.values() if t.status is TaskStatus.UPSTREAM_FAILED
        )
        current = changes.the_workflow()
        return {
            "workflow_id": workflow.workflow_id,
            "task_id": task_id,
            "status": str(TaskStatus.DEAD),
            "upstream_failed": skipped,
            "workflow_status": str(current.status),
        }

    async def _cancel(self, workflow: WorkflowRecord, task_id: str | None) -> dict[str, Any]:
        """Cancel a workflow, or one task and everything downstream of it.

        Unfinished tasks end ``cancelled`` at once (so nothing waits on a worker that may be gone);
        workers are told on ``{ns}.control`` to stop the running ones and skip queued ones.
        """
        async with self._locks.hold(workflow.workflow_id):
            changes = await self._load(workflow.workflow_id, everything=True)
            cancelled = actions.cancel(changes, task_id, time.time())
            if cancelled:
                ended = await self._commit(changes)
                if ended is not None:
                    await self._announce(ended)
        log.warning("cancelled %d task(s) of workflow %s", len(cancelled), workflow.workflow_id)
        current = changes.the_workflow()
        return {"workflow_id": workflow.workflow_id, "cancelled": cancelled, "status": str(current.status)}

    async def _broadcast_cancel(self, workflow_id: str, task_ids: list[str]) -> None:
        """Tell every worker on ``{ns}.control`` to stop and drop these tasks. The ids are always
        listed: a workflow-wide cancel would also drop a task of it replayed later."""
        control = {"kind": "cancel", "workflow_id": workflow_id, "task_ids": task_ids}
        await self._amqp.publish(names.control_exchange(self.ns), "", codec.encode(control), mandatory=False)

    async def _cancels(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The RPC ``cancelled``: one page of the tasks whose copies workers must drop."""
        cursor = request.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise ProtocolError(f"cursor must be a string, not {type(cursor).__name__}")
        page = await self._store.recalled(cursor=cursor)
        return cancels_answer(page.items, page.next_cursor)

    async def _why(self, workflow: WorkflowRecord, task_id: str | None) -> list[dict[str, Any]]:
        """For each unfinished task (or the one asked about): why it is not running, or where it runs."""
        tasks = await self._store.get_tasks(workflow.workflow_id)
        selected = why.select(tasks, workflow.workflow_id, task_id)
        now = time.time()
        # Stopped and lost agents are left out; alive but unhealthy ones serve (the watchdog's mark is named).
        who = why.serving((await self._agents.census(now)).live())
        depths: dict[str, int] = {}
        for capability in why.queues_to_read(selected, now):
            info = await self._amqp.queue_info(names.capability_queue(self.ns, capability))
            depths[capability] = info.messages if info is not None else 0
        return why.explain(workflow.workflow_id, tasks, selected, now=now, who=who, depths=depths)

    async def status_document(self, workflow: WorkflowRecord) -> dict[str, Any]:
        tasks = await self._store.get_tasks(workflow.workflow_id)
        counts: dict[str, int] = {}
        for t in tasks.values():
            counts[str(t.status)] = counts.get(str(t.status), 0) + 1
        return {
            "workflow_id": workflow.workflow_id,
            "status": str(workflow.status),
            "created_at": workflow.created_at,
            "finished_at": workflow.finished_at,
            "metadata": workflow.metadata,
            "counts": counts,
            "tasks": {
                t.task_id: {
                    "status": str(t.status),
                    "capability": t.capability,
                    "depends_on": t.depends_on,
                    "attempts": t.attempts,
                    "agent": t.agent,
                    "error": t.error,
                    "history": t.history,
                    "escalation": t.escalation,
                    "queued_at": t.queued_at,
                    "started_at": t.started_at,
                    "finished_at": t.finished_at,
                    "lease_s": t.lease_s,
                }
                for t in tasks.values()
            },
        }

    @contextlib.contextmanager
    def http_span(self, method: str, route: str, request_headers: Mapping[str, str]) -> Iterator[None]:
        """A SERVER span for an HTTP request handled by the router, under the client's ``traceparent``
        when it sent one. An HTTP submission's workflow is traced under it, as an AMQP one is under the
        ``process {ns}.router.submit`` span."""
        attributes = {"http.request.method": method, "http.route": route}
        parent = self._telemetry.extract(request_headers)
        with self._telemetry.span(f"{method} {route}", SpanKind.SERVER, attributes, parent=parent):
            yield

    async def refuse(self, message_id: str | None, refusal: Refusal, content_type: str | None) -> Submitted:
        """Refuse a submission the caller found bad before admission (an HTTP body over the limit)."""
        reply_type = codec.normalize_content_type(content_type) or codec.JSON
        return await self._refuse(message_id, refusal, _no_reply, reply_type)

    async def cancel(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        """Cancel a workflow, or a task and everything downstream of it (as ``fabric cancel``).

        Raises:
            KeyError: no such workflow, or no such task in it.
        """
        return await self._cancel(await self._workflow(workflow_id), task_id)

    async def resume(self, workflow_id: str, task_id: str, **new: Any) -> dict[str, Any]:
        """Run an escalated task again with a fresh attempt budget (as ``fabric resume``); pass
        ``input=...`` to replace its input.

        Raises:
            KeyError: no such workflow, or no such task in it.
            ProtocolError: the new input is larger than ``router.max_body_bytes``.
            ValueError: the task is not escalated.
        """
        return await self._resume(await self._workflow(workflow_id), task_id, new)

    async def abort(self, workflow_id: str, task_id: str, reason: str | None = None) -> dict[str, Any]:
        """End an escalated task ``dead`` with ``reason`` (as ``fabric abort``).

        Raises:
            KeyError: no such workflow, or no such task in it.
            ValueError: the task is not escalated.
        """
        return await self._abort(await self._workflow(workflow_id), task_id, reason)

    async def why(self, workflow_id: str, task_id: str | None = None) -> list[dict[str, Any]]:
        """Why each unfinished task (or the one asked about) is not running, as ``fabric why``.

        Raises:
            KeyError: no such workflow, or no such task in it.
        """
        return await self._why(await self._workflow(workflow_id), task_id)

    async def _workflow(self, workflow_id: str) -> WorkflowRecord:
        """The stored workflow ``workflow_id``; raises KeyError when there is none."""
        workflow = await self._store.get_workflow(workflow_id)
        if workflow is None:
            raise KeyError(f"no workflow {workflow_id!r}")
        return workflow

    # The read side of :class:`Monitoring`, so a Router serves where a Monitoring part is asked for.

    @property
    def published_capabilities(self) -> Set[str]:
        return self.monitoring.published_capabilities

    def counters(self) -> dict[str, int]:
        return self.monitoring.counters()

    def totals(self) -> dict[str, int]:
        return self.monitoring.totals()

    def firing_alerts(self) -> list[Alert]:
        return self.monitoring.firing_alerts()

    async def agents(self) -> list[dict[str, Any]]:
        """Every agent seen, with its state (``alive``, ``unhealthy``, ``lost``, ``stopped``), by id."""
        return await self.monitoring.agents()

    async def queue_depths(self, capabilities: Iterable[str]) -> dict[str, dict[str, Any]]:
        return await self.monitoring.queue_depths(capabilities)

    async def dead_queue_depth(self) -> dict[str, Any] | None:
        return await self.monitoring.dead_queue_depth()

    # -- heartbeats -------------------------------------------------------------------------------

    async def _on_heartbeat(self, delivery: Delivery) -> None:
        try:
            beat = Heartbeat.model_validate(
                codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
            )
        except (ProtocolError, ValidationError) as exc:
            log.warning("malformed heartbeat dropped: %s", exc)
            await delivery.ack()
            return
        self._renew_leases([(w, t, a) for w, t, a in beat.leases], time.time())
        await self._agents.record(beat)
        await delivery.ack()

    # -- failure handling of the router itself ----------------------------------------------------

    async def _guarded(self, delivery: Delivery, work: Any, *, reply_on_bug: bool = False) -> None:
        """Run ``work``; on a store or broker failure requeue the message after a pause, on a bug park it."""
        with self._tracked():
            await self._run_guarded(delivery, work, reply_on_bug=reply_on_bug)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Count the current message handler as in flight, so shutdown waits for it to settle."""
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _run_guarded(self, delivery: Delivery, work: Any, *, reply_on_bug: bool) -> None:
        try:
            await work
        except (StoreError, TransportError) as exc:
            await self._requeue_later(delivery, exc)
        except Exception as exc:
            log.critical("router failed on message %s; parking it", delivery.message_id, exc_info=True)
            if reply_on_bug:
                # The submitter must not wait forever: tell it, and keep the message for inspection.
                refusal = Rejected(
                    workflow_id=None,
                    reason=RejectReason.INVALID,
                    detail=f"the router could not process this submission ({type(exc).__name__}: {exc}); "
                    f"it was parked in {names.dead_queue(self.ns)}",
                )
                with contextlib.suppress(Exception):
                    reply_type = codec.normalize_content_type(delivery.content_type) or codec.JSON
                    await self.announcer.reply(
                        delivery.reply_to,
                        delivery.correlation_id,
                        refusal.model_dump(mode="json"),
                        reply_type,
                    )
            await self._park(delivery, "router_error", f"{type(exc).__name__}: {exc}")

    async def _requeue_later(self, delivery: Delivery, exc: BaseException) -> None:
        log.warning("could not process message %s (%s); requeueing it", delivery.message_id, exc)
        await asyncio.sleep(_REQUEUE_PAUSE_S)
        await delivery.nack(requeue=True)

    async def _park(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Move a message the router cannot process to ``{ns}.dead`` with the reason, then ack it."""
        try:
            await park_as_received(
                self._amqp, names.dead_exchange(self.ns), delivery, reason=reason, detail=detail
            )
        except TransportError as exc:
            await self._requeue_later(delivery, exc)
            return
        log.error(
            "parked message %s on %s: %s: %s", delivery.message_id, names.dead_queue(self.ns), reason, detail
        )
        await delivery.ack()


#: Committed task counters that are the outcome of an attempt (for the error-rate rule).
_ATTEMPT_OUTCOMES = frozenset({"succeeded", "retried", "failed", "parked", "escalated"})


def _escalation_key(workflow_id: str, task_id: str) -> str:
    """The de-duplication key of a task's ``task.escalated`` alert."""
    return f"task.escalated:{workflow_id}/{task_id}"


def lease_lapsed(renewed_at: float, lease_s: float | None, now: float) -> bool:
    """Whether a lease last renewed at ``renewed_at`` (seconds since the epoch) has lapsed by ``now``.

    Example:
        >>> lease_lapsed(100.0, 60.0, 159.0), lease_lapsed(100.0, 60.0, 161.0)
        (False, True)
    """
    return lease_s is not None and now - renewed_at > lease_s
