"""Prometheus metrics: the only module that imports ``prometheus_client``.

Every router and worker owns a :class:`RouterMetrics` or :class:`WorkerMetrics` with a registry of its
own (never the library's global one), so several can live in one process (the tests run a router and
workers side by side) and nothing is registered at import. ``render()`` is what ``/metrics`` serves.

The hot path stays cheap: a labelled child is looked up once per label value and kept in a plain dict
(no ``labels()`` call per task), values that are cheaper to read than to keep up to date (in-flight
tasks, breaker states) are read at scrape time, and label values are bounded: past
:data:`MAX_LABEL_VALUES` distinct capabilities, the rest are counted under ``capability="_other"``.

The names are listed in the README ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["MAX_LABEL_VALUES", "RouterMetrics", "TaskCounter", "WorkerCounter", "WorkerMetrics"]

#: Distinct values a label takes at most; beyond, samples go to ``_other`` (a flood of made-up
#: capability names must not blow up the scrape).
MAX_LABEL_VALUES: Final = 1000
_OTHER: Final = "_other"

#: Task run times and queue waits: milliseconds to an hour.
_TASK_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
#: Whole workflows: up to a day.
_WORKFLOW_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
#: Broker confirms and store calls: a fraction of a millisecond to seconds.
_IO_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip

#: The router's task counters, by the name of their metric (``fabric_tasks_<name>_total``).
TaskCounter = Literal["submitted", "started", "succeeded", "failed", "retried", "parked", "escalated"]
#: A worker's, ``fabric_worker_tasks_<name>_total``.
WorkerCounter = Literal[
    "started", "succeeded", "failed", "retried", "parked", "escalated", "adopted", "leased"
]


class _Children:
    """Labelled children of one metric, looked up once per label values and then kept."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def get(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(self._children) >= MAX_LABEL_VALUES:
                values = (_OTHER,) * len(values)
                child = self._children.get(values)
                if child is not None:
                    return child
            child = self._metric.labels(*values)
            self._children[values] = child
        return child

    def remove(self, *values: str) -> None:
        if self._children.pop(values, None) is not None:
            self._metric.remove(*values)

    def label_values(self) -> list[tuple[str, ...]]:
        return list(self._children)


class _Callback(Collector):
    """Gauges (or counters kept elsewhere) read at scrape time: ``read()`` yields ``(labels, value)``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Iterable[str],
        read: Callable[[], Iterable[Any]],
        family: type[GaugeMetricFamily] | type[CounterMetricFamily] = GaugeMetricFamily,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._read = read
        self._family = family

    def describe(self) -> Iterator[Metric]:
        yield self._family(self._name, self._documentation, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = self._family(self._name, self._documentation, labels=self._labels)
        for labels, value in self._read():
            family.add_metric(list(labels), float(value))
        yield family


class _Metrics:
    """A registry of one process's own, with the standard process, platform and GC collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Resource usage of this process: CPU seconds, resident memory, open file descriptors, start time.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self) -> str:
        """The Prometheus text exposition of every metric of this process."""
        return generate_latest(self.registry).decode()

    def gauge_from(
        self, name: str, documentation: str, read: Callable[[], Iterable[Any]], labels: Iterable[str] = ()
    ) -> None:
        """A gauge computed when scraped (nothing to keep up to date on the hot path)."""
        self.registry.register(_Callback(name, documentation, labels, read))

    def counter_from(
        self, name: str, documentation: str, read: Callable[[], Iterable[Any]], labels: Iterable[str] = ()
    ) -> None:
        """A counter kept by another object (monotonic), read when scraped; exposed as ``<name>_total``."""
        self.registry.register(_Callback(name, documentation, labels, read, CounterMetricFamily))

    def _publish_histogram(self, name: str) -> _Children:
        return _Children(
            Histogram(
                name,
                "Time from publishing a message to the broker's confirm, by exchange.",
                ["exchange"],
                buckets=_IO_BUCKETS,
                registry=self.registry,
            )
        )


class RouterMetrics(_Metrics):
    """The router's metrics: the fabric-wide task and workflow counts (from the events it records),
    queue depths and agents, and its own publish-confirm and store latencies.

    Example:
        >>> metrics = RouterMetrics()
        >>> metrics.count_task("started", "demo.echo")
        >>> "fabric_tasks_started_total" in metrics.render()
        True
    """

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        descriptions: dict[TaskCounter, str] = {
            "submitted": "Tasks accepted in new workflows.",
            "started": "Task attempts started (as reported by workers).",
            "succeeded": "Tasks that succeeded.",
            "failed": "Tasks that ended failed (not retried any more, not parked).",
            "retried": "Failed attempts that will be retried or reassigned.",
            "parked": "Tasks parked on the dead-letter queue (ended dead).",
            "escalated": "Escalations to an operator (a resumed task may escalate again).",
        }
        #: Totals over every capability, read by the dashboard (rates, samples): plain ints, no scrape.
        self.totals: dict[str, int] = dict.fromkeys(
            [*(f"tasks_{name}" for name in descriptions), "workflows_submitted", "workflows_finished"], 0
        )
        self._tasks = {
            name: _Children(Counter(f"fabric_tasks_{name}", text, ["capability"], registry=r))
            for name, text in descriptions.items()
        }
        self._workflows_submitted = Counter(
            "fabric_workflows_submitted", "Workflows accepted (new ones, not resubmissions).", registry=r
        )
        self._workflows_completed = _Children(
            Counter(
                "fabric_workflows_completed", "Workflows that finished, by status.", ["status"], registry=r
            )
        )
        self._workflow_duration = _Children(
            Histogram(
                "fabric_workflow_duration_seconds",
                "Time from a workflow's acceptance to its end, by status.",
                ["status"],
                buckets=_WORKFLOW_BUCKETS,
                registry=r,
            )
        )
        self._rejected = _Children(
            Counter("fabric_submissions_rejected", "Submissions rejected, by reason.", ["reason"], registry=r)
        )
        self._publish = self._publish_histogram("fabric_router_publish_confirm_seconds")
        self._store = _Children(
            Histogram(
                "fabric_router_store_seconds",
                "Duration of state store calls, by operation.",
                ["operation"],
                buckets=_IO_BUCKETS,
                registry=r,
            )
        )
        self._queue_messages = _Children(
            Gauge(
                "fabric_queue_messages",
                "Messages ready in a queue (passive declare by the router); capability queues carry "
                "their capability.",
                ["queue", "capability"],
                registry=r,
            )
        )
        self._queue_consumers = _Children(
            Gauge("fabric_queue_consumers", "Consumers of a queue.", ["queue", "capability"], registry=r)
        )
        self._agents = _Children(Gauge("fabric_agents", "Agents known, by state.", ["state"], registry=r))
        self._agents_alive = _Children(
            Gauge("fabric_agents_alive", "Live agents serving a capability.", ["capability"], registry=r)
        )
        self._breakers_open = _Children(
            Gauge(
                "fabric_breakers_open",
                "Live agents whose circuit breaker for the capability is open or half-open.",
                ["capability"],
                registry=r,
            )
        )

    def count_task(self, counter: TaskCounter, capability: str, amount: int = 1) -> None:
        self._tasks[counter].get(capability).inc(amount)
        self.totals[f"tasks_{counter}"] += amount

    def workflow_submitted(self) -> None:
        self._workflows_submitted.inc()
        self.totals["workflows_submitted"] += 1

    def workflow_finished(self, status: str, duration_s: float) -> None:
        self.totals["workflows_finished"] += 1
        self._workflows_completed.get(status).inc()
        self._workflow_duration.get(status).observe(max(0.0, duration_s))

    def rejected(self, reason: str) -> None:
        self._rejected.get(reason).inc()

    def observe_publish(self, exchange: str, seconds: float) -> None:
        self._publish.get(exchange).observe(seconds)

    def observe_store(self, operation: str, seconds: float) -> None:
        self._store.get(operation).observe(seconds)

    def set_queues(self, depths: Mapping[str, tuple[str, int, int] | None]) -> None:
        """Queue depths by queue name: ``(capability or "", messages, consumers)``, None for a queue
        that does not exist (its series are dropped)."""
        for queue, info in depths.items():
            if info is None:
                for key in self._queue_messages.label_values():
                    if key[0] == queue:
                        self._queue_messages.remove(*key)
                        self._queue_consumers.remove(*key)
                continue
            capability, messages, consumers = info
            self._queue_messages.get(queue, capability).set(messages)
            self._queue_consumers.get(queue, capability).set(consumers)

    def set_agents(
        self,
        *,
        alive: int,
        lost: int,
        alive_by_capability: Mapping[str, int],
        open_by_capability: Mapping[str, int],
        unhealthy: int = 0,
        stopped: int = 0,
    ) -> None:
        """Agents seen through heartbeats (``unhealthy``: alive, but marked by the stall watchdog;
        ``stopped``: its last heartbeat said it stopped cleanly); capabilities no live agent serves any
        more read 0."""
        self._agents.get("alive").set(alive)
        self._agents.get("unhealthy").set(unhealthy)
        self._agents.get("lost").set(lost)
        self._agents.get("stopped").set(stopped)
        for (capability,) in self._agents_alive.label_values():
            if capability not in alive_by_capability:
                self._agents_alive.get(capability).set(0)
                self._breakers_open.get(capability).set(0)
        for capability, count in alive_by_capability.items():
            self._agents_alive.get(capability).set(count)
            self._breakers_open.get(capability).set(open_by_capability.get(capability, 0))


class WorkerMetrics(_Metrics):
    """One worker's metrics: what its own attempts did, how long they ran and waited, its load and its
    circuit breakers.

    Args:
        capabilities: the agent's capabilities (their children are made up front).
        in_flight: reads the tasks running now.
        breakers: reads each capability's breaker state (``closed``, ``half_open``, ``open``).

    Example:
        >>> metrics = WorkerMetrics(
        ...     ["demo.echo"], in_flight=lambda: 0, concurrency=8, overdue_threads=lambda: 0, breakers=dict
        ... )
        >>> metrics.started("demo.echo", queue_wait_s=0.02)
    """

    BREAKER_STATES: Final = ("closed", "half_open", "open")

    def __init__(
        self,
        capabilities: Iterable[str],
        *,
        in_flight: Callable[[], int],
        concurrency: int,
        overdue_threads: Callable[[], int],
        breakers: Callable[[], Mapping[str, str]],
        under_lease: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__()
        r = self.registry
        descriptions: dict[WorkerCounter, str] = {
            "started": "Task attempts this worker started.",
            "succeeded": "Task attempts this worker ran successfully.",
            "failed": "Task attempts that failed on this worker (whatever the policy decided next).",
            "retried": "Failed attempts this worker sent to be retried or reassigned.",
            "parked": "Task messages this worker parked on the dead-letter queue.",
            "escalated": "Tasks this worker escalated to an operator.",
            "adopted": "Copies of task messages delivered again for an attempt this worker runs or "
            "reported (consumer_timeout, a dropped connection): not run again.",
            "leased": "Task attempts that outlived lease_after_s: acked, they ran on under a lease.",
        }
        self._counters = {
            name: _Children(Counter(f"fabric_worker_tasks_{name}", text, ["capability"], registry=r))
            for name, text in descriptions.items()
        }
        self._duration = _Children(
            Histogram(
                "fabric_worker_task_duration_seconds",
                "Run time of task attempts (the handler), by capability and outcome.",
                ["capability", "outcome"],
                buckets=_TASK_BUCKETS,
                registry=r,
            )
        )
        self._queue_wait = _Children(
            Histogram(
                "fabric_worker_task_queue_wait_seconds",
                "Time from a task's dispatch (or the end of its retry delay) to the start of its attempt.",
                ["capability"],
                buckets=_TASK_BUCKETS,
                registry=r,
            )
        )
        self._publish = self._publish_histogram("fabric_worker_publish_confirm_seconds")
        for capability in capabilities:
            for counter in self._counters.values():
                counter.get(capability)
            self._queue_wait.get(capability)
        self.gauge_from(
            "fabric_worker_tasks_in_flight", "Task attempts running now.", lambda: [((), in_flight())]
        )
        self.gauge_from(
            "fabric_worker_concurrency",
            "Tasks this worker runs at once at most.",
            lambda: [((), concurrency)],
        )
        self.gauge_from(
            "fabric_worker_tasks_under_lease",
            "Task attempts running now under a lease (their message acked; heartbeats renew them).",
            lambda: [((), under_lease())],
        )
        self.gauge_from(
            "fabric_worker_handler_threads_overdue",
            "Sync handlers still running on their thread after their task ended (timed out, cancelled).",
            lambda: [((), overdue_threads())],
        )

        def breaker_states() -> Iterator[tuple[tuple[str, str], int]]:
            for capability, state in breakers().items():
                for candidate in self.BREAKER_STATES:
                    yield (capability, candidate), int(state == candidate)

        self.gauge_from(
            "fabric_worker_breaker_state",
            "Circuit breaker of each capability: 1 for its current state, 0 for the others.",
            breaker_states,
            labels=("capability", "state"),
        )

    def count(self, counter: WorkerCounter, capability: str) -> None:
        self._counters[counter].get(capability).inc()

    def started(self, capability: str, queue_wait_s: float | None) -> None:
        self._counters["started"].get(capability).inc()
        if queue_wait_s is not None:
            self._queue_wait.get(capability).observe(max(0.0, queue_wait_s))

    def ran(self, capability: str, outcome: str, seconds: float) -> None:
        self._duration.get(capability, outcome).observe(seconds)

    def observe_publish(self, exchange: str, seconds: float) -> None:
        self._publish.get(exchange).observe(seconds)
