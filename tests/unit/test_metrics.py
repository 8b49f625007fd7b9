"""The metrics module: per-process registries, bounded labels, timed store calls."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fabric.metrics import MAX_LABEL_VALUES, RouterMetrics, WorkerMetrics
from fabric.store import open_store
from fabric.store.base import WorkflowRecord
from fabric.store.timed import timed


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_object_has_its_own_registry() -> None:
    first, second = RouterMetrics(), RouterMetrics()
    first.count_task("started", "a", 2)
    assert samples(first.render())[("fabric_tasks_started_total", frozenset({("capability", "a")}))] == 2
    assert ("fabric_tasks_started_total", frozenset({("capability", "a")})) not in samples(second.render())


def test_label_values_are_bounded() -> None:
    metrics = RouterMetrics()
    for i in range(MAX_LABEL_VALUES + 5):
        metrics.count_task("submitted", f"cap{i}")
    found = {
        dict(labels)["capability"]: v
        for (name, labels), v in samples(metrics.render()).items()
        if name == "fabric_tasks_submitted_total"
    }
    assert len(found) == MAX_LABEL_VALUES + 1
    assert found["_other"] == 5


def test_worker_gauges_are_read_when_scraped() -> None:
    state = {"in_flight": 0, "breaker": "closed"}
    metrics = WorkerMetrics(
        ["c"],
        in_flight=lambda: state["in_flight"],
        concurrency=4,
        overdue_threads=lambda: 0,
        breakers=lambda: {"c": state["breaker"]},
    )
    state.update(in_flight=3, breaker="open")
    found = samples(metrics.render())
    assert found[("fabric_worker_tasks_in_flight", frozenset())] == 3
    assert found[("fabric_worker_breaker_state", frozenset({("capability", "c"), ("state", "open")}))] == 1
    assert found[("fabric_worker_breaker_state", frozenset({("capability", "c"), ("state", "closed")}))] == 0
    # Counters of the agent's capabilities exist from the start, at 0.
    assert found[("fabric_worker_tasks_started_total", frozenset({("capability", "c")}))] == 0


def test_queue_series_of_a_deleted_queue_are_dropped() -> None:
    metrics = RouterMetrics()
    metrics.set_queues({"ns.cap.a": ("a", 4, 1)})
    key = ("fabric_queue_messages", frozenset({("queue", "ns.cap.a"), ("capability", "a")}))
    assert samples(metrics.render())[key] == 4
    metrics.set_queues({"ns.cap.a": None})
    assert key not in samples(metrics.render())


async def test_timed_store_reports_every_call() -> None:
    seen: list[str] = []
    async with timed(open_store("memory://"), lambda op, s: seen.append(op)) as store:
        await store.get_workflow("nope")
        await store.insert_workflow(WorkflowRecord("w", "f", 0, 0), [])
        assert (await store.get_workflow("w")) is not None
    assert seen == ["get_workflow", "insert_workflow", "get_workflow"]
