"""One trace per workflow, exported over OTLP to a receiver run by the test."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider

from fabric import Agent, FabricClient, Retry, Task
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.telemetry import Telemetry
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.rabbitmq

SERVER, CONSUMER, PRODUCER = 2, 5, 4  # OTLP span kinds


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as r:
        yield r


def traced(name: str, receiver: OtlpReceiver) -> Telemetry:
    return Telemetry(name, enabled=True, exporter=OTLPSpanExporter(endpoint=receiver.endpoint, timeout=5))


async def test_a_workflow_is_one_trace(
    settings: FabricSettings, receiver: OtlpReceiver, extra_caps: list[str]
) -> None:
    agent = Agent("traced")
    extra_caps.extend(["t.step", "t.flaky"])

    @agent.handler("t.step")
    async def step(task: Task) -> int:
        return 1

    @agent.handler("t.flaky")
    async def flaky(task: Task) -> int:
        if task.attempt == 1:
            raise Retry("once", delay_s=1)
        return 2

    # The client's own trace: the workflow's trace hangs under it.
    client_tracer = TracerProvider().get_tracer("test-client")
    async with (
        Router(settings, telemetry=traced("fabric-router", receiver)),
        Worker(agent, settings, telemetry=traced("fabric-worker", receiver)),
        FabricClient(settings) as client,
    ):
        with client_tracer.start_as_current_span("client request") as client_span:
            done = await client.run(
                {
                    "workflow_id": "traced-1",
                    "tasks": [
                        {"id": "a", "capability": "t.step"},
                        {"id": "b", "capability": "t.flaky", "depends_on": ["a"]},
                        {"id": "c", "capability": "t.step", "depends_on": ["a"]},
                        {"id": "d", "capability": "t.step", "depends_on": ["b", "c"]},
                        {"id": "e", "capability": "t.step"},
                    ],
                },
                timeout_s=60,
            )
        assert done.status == "succeeded"
    # Router and worker flushed their spans on exit.
    spans = receiver.spans
    await eventually(
        lambda: len([s for s in spans if s.kind == CONSUMER and s.service == "fabric-worker"]) >= 6,
        what="every attempt's span",
    )
    client_trace = format(client_span.get_span_context().trace_id, "032x")
    assert {s.trace_id for s in spans} == {client_trace}, "one trace for the whole workflow"

    attempts = [s for s in spans if s.kind == CONSUMER and s.service == "fabric-worker"]
    per_task = Counter(s.attributes["fabric.task.id"] for s in attempts)
    assert per_task == {"a": 1, "b": 2, "c": 1, "d": 1, "e": 1}, "one span per attempt"
    assert all(s.attributes["fabric.workflow.id"] == "traced-1" for s in attempts)
    assert {s.attributes["fabric.attempt"] for s in attempts if s.attributes["fabric.task.id"] == "b"} == {
        1,
        2,
    }
    failed_b = next(
        s for s in attempts if s.attributes["fabric.task.id"] == "b" and s.attributes["fabric.attempt"] == 1
    )
    assert failed_b.status_code == 2, "the failed attempt is marked as an error"
    assert failed_b.attributes["error.type"] == "Retry"

    by_id = {s.span_id: s for s in spans}
    submit = next(s for s in spans if s.name.endswith(".router.submit"))
    assert submit.parent_span_id == format(client_span.get_span_context().span_id, "016x")
    # Every attempt hangs under a router publish; a dependent's publish under an attempt of its dependency.
    for attempt in attempts:
        publish = by_id[attempt.parent_span_id]
        assert publish.kind == PRODUCER
        assert publish.attributes["fabric.task.id"] == attempt.attributes["fabric.task.id"]
    publish_b = next(s for s in spans if s.kind == PRODUCER and s.attributes.get("fabric.task.id") == "b")
    assert by_id[publish_b.parent_span_id].attributes["fabric.task.id"] == "a"
    publish_a = next(s for s in spans if s.kind == PRODUCER and s.attributes.get("fabric.task.id") == "a")
    assert publish_a.parent_span_id == submit.span_id


async def test_an_http_submission_is_one_trace_under_the_clients(
    settings: FabricSettings, receiver: OtlpReceiver
) -> None:
    """POST /api/v1/workflows is the root of the workflow's trace, under the client's traceparent."""
    import httpx

    from workers.demo import agent as demo

    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with (
        Router(settings, telemetry=traced("fabric-router", receiver)) as router,
        Worker(demo, settings, telemetry=traced("fabric-worker", receiver)),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}") as http,
    ):
        response = await http.post(
            "/api/v1/workflows",
            json={
                "workflow_id": "traced-http",
                "tasks": [
                    {"id": "a", "capability": "demo.echo"},
                    {"id": "b", "capability": "demo.echo", "depends_on": ["a"]},
                ],
            },
            headers={"traceparent": f"00-{client_trace}-{client_span}-01"},
        )
        assert response.status_code == 202, response.text

        async def finished() -> bool:
            doc = (await http.get("/api/v1/workflows/traced-http")).json()
            return bool(doc["kind"] == "completed")

        await eventually(finished, what="the workflow to finish")
        detail = (await http.get("/api/v1/workflows/traced-http")).json()
        assert detail["trace_id"] == client_trace, "the API links the workflow to its trace"
        listed = (await http.get("/api/v1/workflows")).json()["items"]
        assert listed[0]["trace_id"] == client_trace
    spans = receiver.spans
    await eventually(
        lambda: len([s for s in spans if s.kind == CONSUMER and s.service == "fabric-worker"]) >= 2,
        what="every attempt's span",
    )
    submit = next(s for s in spans if s.name == "POST /api/v1/workflows")
    assert (submit.kind, submit.trace_id, submit.parent_span_id) == (SERVER, client_trace, client_span)
    assert submit.attributes["fabric.workflow.id"] == "traced-http"
    assert {s.trace_id for s in spans} == {client_trace}, "one trace for the whole workflow"
    publish_a = next(s for s in spans if s.kind == PRODUCER and s.attributes.get("fabric.task.id") == "a")
    assert publish_a.parent_span_id == submit.span_id


async def test_a_dead_collector_changes_nothing(settings: FabricSettings) -> None:
    from workers.demo import agent as demo

    dead = "http://127.0.0.1:9/v1/traces"  # the discard port: nothing listens
    async with (
        Router(
            settings,
            telemetry=Telemetry("r", enabled=True, exporter=OTLPSpanExporter(endpoint=dead, timeout=1)),
        ),
        Worker(
            demo,
            settings,
            telemetry=Telemetry("w", enabled=True, exporter=OTLPSpanExporter(endpoint=dead, timeout=1)),
        ),
        FabricClient(settings) as client,
    ):
        done = await client.run(
            {"tasks": [{"id": f"t{i}", "capability": "demo.echo", "input": i} for i in range(20)]},
            timeout_s=60,
        )
    assert done.status == "succeeded"
    assert [done.tasks[f"t{i}"].result for i in range(20)] == list(range(20))
