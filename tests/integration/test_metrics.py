"""/metrics on the router and a worker: valid Prometheus text, and counters that move by exactly what a
known workload did."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fabric import Agent, FabricClient, Retry, SubmissionRejected, Task
from fabric.policy import FailFast
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import names
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from tests.integration.test_health import http_get

pytestmark = pytest.mark.rabbitmq

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, parsed by the Prometheus client's own text parser."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (a counter never moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Non-zero samples of ``name`` by the value of ``label``."""
    found = {}
    for (sample, labels), v in samples.items():
        if sample == name and v:
            found[dict(labels)[label]] = v
    return found


@pytest.fixture
async def router(settings: FabricSettings) -> AsyncIterator[Router]:
    fast = settings.model_copy(
        update={"router": settings.router.model_copy(update={"metrics_interval_s": 0.2})}
    )
    async with Router(fast) as r:
        yield r


async def test_counters_move_by_what_a_known_workload_did(
    router: Router, start_worker: StartWorker, client: FabricClient, extra_caps: list[str]
) -> None:
    extra_caps.extend(["m.ok", "m.retry", "m.park", "m.final", "m.nobody"])
    agent = Agent("metered")

    @agent.handler("m.ok")
    async def ok(task: Task) -> int:
        return 1

    @agent.handler("m.retry")
    async def retry(task: Task) -> int:
        if task.attempt == 1:
            raise Retry("once", delay_s=5)  # the 5 s tier: the next attempt must not count it as queue wait
        return 2

    @agent.handler("m.park")
    async def park(task: Task) -> None:
        raise ValueError("always")

    final_agent = Agent("final")

    @final_agent.handler("m.final")
    async def final(task: Task) -> None:
        raise ValueError("no retries here")

    worker = await start_worker(agent)
    final_worker = await start_worker(final_agent, policy=FailFast())
    assert router.http_port
    assert worker.http_port
    assert final_worker.http_port

    with pytest.raises(SubmissionRejected):
        await client.submit(
            {
                "tasks": [
                    {"id": "x", "capability": "m.ok", "depends_on": ["y"]},
                    {"id": "y", "capability": "m.ok", "depends_on": ["x"]},
                ]
            }
        )
    done = await client.run(
        {
            "tasks": [
                {"id": "a", "capability": "m.ok"},
                {"id": "b", "capability": "m.retry", "depends_on": ["a"]},
                {"id": "c", "capability": "m.ok", "depends_on": ["a"]},
                {"id": "d", "capability": "m.park", "max_attempts": 1},
                {"id": "e", "capability": "m.ok", "depends_on": ["d"]},  # never runs: upstream_failed
                {"id": "f", "capability": "m.final"},
            ]
        },
        timeout_s=60,
    )
    assert done.status == "failed"
    assert {t: o.status for t, o in done.tasks.items()} == {
        "a": "succeeded",
        "b": "succeeded",
        "c": "succeeded",
        "d": "dead",
        "e": "upstream_failed",
        "f": "failed",
    }
    # Two tasks wait in a queue no agent consumes: the router reads its depth from the broker.
    await client.submit(
        {"tasks": [{"id": "p", "capability": "m.nobody"}, {"id": "q", "capability": "m.nobody"}]}
    )

    port = router.http_port

    async def router_caught_up() -> Samples | None:
        samples = await scrape(port)
        ready = (
            value(samples, "fabric_queue_messages", queue=names.capability_queue(router.ns, "m.nobody"),
                  capability="m.nobody") == 2
            and value(samples, "fabric_agents_alive", capability="m.ok") == 1
            and value(samples, "fabric_workflows_completed_total", status="failed") == 1
        )  # fmt: skip
        return samples if ready else None

    r = await eventually(router_caught_up, what="queue depth, live agents and completion in /metrics")

    # The fabric-wide task counters, from the events the router recorded.
    assert by_label(r, "fabric_tasks_submitted_total", "capability") == {
        "m.ok": 3, "m.retry": 1, "m.park": 1, "m.final": 1, "m.nobody": 2,
    }  # fmt: skip
    assert by_label(r, "fabric_tasks_started_total", "capability") == {
        "m.ok": 2, "m.retry": 2, "m.park": 1, "m.final": 1,
    }  # fmt: skip
    assert by_label(r, "fabric_tasks_succeeded_total", "capability") == {"m.ok": 2, "m.retry": 1}
    assert by_label(r, "fabric_tasks_retried_total", "capability") == {"m.retry": 1}
    assert by_label(r, "fabric_tasks_parked_total", "capability") == {"m.park": 1}
    assert by_label(r, "fabric_tasks_failed_total", "capability") == {"m.final": 1}
    assert value(r, "fabric_workflows_submitted_total") == 2
    assert value(r, "fabric_submissions_rejected_total", reason="cycle") == 1
    assert value(r, "fabric_workflow_duration_seconds_count", status="failed") == 1
    # The workflow waited out the 5 s retry tier (80-100 % of it, jittered).
    assert value(r, "fabric_workflow_duration_seconds_sum", status="failed") >= 4
    # One confirmed publish to {ns}.tasks per dispatched task (a, b, c, d, f, p, q; e never ran).
    assert (
        value(r, "fabric_router_publish_confirm_seconds_count", exchange=names.tasks_exchange(router.ns)) == 7
    )
    assert value(r, "fabric_router_store_seconds_count", operation="insert_workflow") == 2
    assert value(r, "fabric_agents", state="alive") == 2
    assert value(r, "fabric_breakers_open", capability="m.ok") == 0
    assert (
        value(r, "fabric_queue_consumers", queue=names.capability_queue(router.ns, "m.ok"), capability="m.ok")
        == 1
    )
    assert value(r, "fabric_queue_messages", queue=names.dead_queue(router.ns), capability="") == 1
    assert value(r, "process_resident_memory_bytes") > 0
    assert "fabric_router_messages_in_flight" in {name for name, _ in r}

    # The worker: its own attempts, their run times and queue waits, its load and breakers.
    w = await scrape(worker.http_port)
    assert by_label(w, "fabric_worker_tasks_started_total", "capability") == {
        "m.ok": 2,
        "m.retry": 2,
        "m.park": 1,
    }
    assert by_label(w, "fabric_worker_tasks_succeeded_total", "capability") == {"m.ok": 2, "m.retry": 1}
    assert by_label(w, "fabric_worker_tasks_failed_total", "capability") == {"m.retry": 1, "m.park": 1}
    assert by_label(w, "fabric_worker_tasks_retried_total", "capability") == {"m.retry": 1}
    assert by_label(w, "fabric_worker_tasks_parked_total", "capability") == {"m.park": 1}
    duration = "fabric_worker_task_duration_seconds_count"
    assert value(w, duration, capability="m.ok", outcome="succeeded") == 2
    assert value(w, duration, capability="m.retry", outcome="failed") == 1
    assert value(w, duration, capability="m.retry", outcome="succeeded") == 1
    assert value(w, duration, capability="m.park", outcome="failed") == 1
    wait = "fabric_worker_task_queue_wait_seconds"
    assert value(w, f"{wait}_count", capability="m.ok") == 2
    assert value(w, f"{wait}_count", capability="m.retry") == 2
    # Queue wait counts from the end of the retry delay, not from the first dispatch (>= 4 s before).
    assert value(w, f"{wait}_sum", capability="m.retry") < 3
    assert value(w, "fabric_worker_tasks_in_flight") == 0
    assert value(w, "fabric_worker_concurrency") == worker.concurrency
    assert value(w, "fabric_worker_breaker_state", capability="m.ok", state="closed") == 1
    assert value(w, "fabric_worker_breaker_state", capability="m.ok", state="open") == 0
    assert (
        value(w, "fabric_worker_publish_confirm_seconds_count", exchange=names.retry_exchange(router.ns)) == 1
    )
    assert value(w, "process_cpu_seconds_total") > 0

    f = await scrape(final_worker.http_port)
    assert by_label(f, "fabric_worker_tasks_failed_total", "capability") == {"m.final": 1}
    assert by_label(f, "fabric_worker_tasks_retried_total", "capability") == {}


async def test_two_routers_in_one_process_keep_their_own_metrics(settings: FabricSettings) -> None:
    """Each process object has a registry of its own (not prometheus_client's global one)."""
    async with Router(settings) as first, Router(settings) as second:
        first.metrics.count_task("started", "demo.echo")
        assert 'fabric_tasks_started_total{capability="demo.echo"} 1.0' in first.render_metrics()
        assert 'capability="demo.echo"' not in second.render_metrics()
