"""One trace per workflow, exported over OTLP to a receiver run by the test."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider

from fabric import Abort, Agent, FabricClient, Retry, Task
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.telemetry import Telemetry
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.otlp import OtlpReceiver, ReceivedSpan

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
        Worker(agent, settings, telemetry=traced("fabric-worker", receiver)) as worker,
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
    assert all(s.attributes["fabric.agent.id"] == worker.agent_id for s in attempts)

    def attempt_of(task_id: str, attempt: int = 1) -> ReceivedSpan:
        return next(
            s
            for s in attempts
            if s.attributes["fabric.task.id"] == task_id and s.attributes["fabric.attempt"] == attempt
        )

    # Retries keep the trace: both attempts of b hang under the one release of b, and the second
    # links to the first.
    b1, b2 = attempt_of("b", 1), attempt_of("b", 2)
    assert b1.parent_span_id == b2.parent_span_id == publish_b.span_id
    assert [(link.span_id, link.attributes) for link in b2.linked] == [
        (b1.span_id, {"fabric.link.type": "previous_attempt"})
    ]
    assert b1.linked == [], "a first attempt of a task released by its only dependency links nothing"
    # d waits for b and c: its parent is the release by whichever finished last, and it links to the other.
    d = attempt_of("d")
    publish_d = by_id[d.parent_span_id]
    releaser = by_id[publish_d.parent_span_id]
    assert releaser.attributes["fabric.task.id"] in ("b", "c")
    assert releaser.kind == CONSUMER
    other = attempt_of("c") if releaser.attributes["fabric.task.id"] == "b" else b2
    assert releaser.span_id in (b2.span_id, attempt_of("c").span_id), "released by a succeeded attempt"
    assert [(link.trace_id, link.span_id, link.attributes) for link in d.linked] == [
        (
            client_trace,
            other.span_id,
            {"fabric.link.type": "dependency", "fabric.task.id": other.attributes["fabric.task.id"]},
        )
    ]
    assert attempt_of("a").linked == attempt_of("e").linked == []


async def test_parking_and_replay_keep_the_trace(
    settings: FabricSettings, receiver: OtlpReceiver, extra_caps: list[str]
) -> None:
    """A task parked after its attempts, replayed by an operator: the new attempt is in the workflow's
    trace and links to the parked one."""
    agent = Agent("parking")
    extra_caps.append("t.once")
    runs: list[int] = []

    @agent.handler("t.once")
    async def once(task: Task) -> int:
        runs.append(task.attempt)
        if len(runs) == 1:
            raise Abort("not now")
        return 3

    async with (
        Router(settings, telemetry=traced("fabric-router", receiver)),
        Worker(agent, settings, telemetry=traced("fabric-worker", receiver)),
        FabricClient(settings) as client,
    ):
        first = await client.run(
            {"workflow_id": "traced-park", "tasks": [{"id": "x", "capability": "t.once"}]}, timeout_s=60
        )
        assert first.tasks["x"].status == "dead"
        await client.query("replay", "traced-park", task_id="x")

        async def succeeded() -> bool:
            doc = await client.query("status", "traced-park")
            return bool(doc["tasks"]["x"]["status"] == "succeeded")

        await eventually(succeeded, what="the replayed task to succeed")
    spans = receiver.spans

    def worker_spans() -> list[ReceivedSpan]:
        return [s for s in spans if s.kind == CONSUMER and s.service == "fabric-worker"]

    await eventually(lambda: len(worker_spans()) >= 2, what="both attempts' spans")
    attempts = worker_spans()
    assert len(attempts) == 2
    assert len({s.trace_id for s in spans}) == 1, "one trace, through parking and the replay"
    parked, replayed = sorted(attempts, key=lambda s: s.start_ns)
    assert parked.status_code == 2
    assert [(link.span_id, link.attributes) for link in replayed.linked] == [
        (parked.span_id, {"fabric.link.type": "previous_attempt"})
    ]
    submit = next(s for s in spans if s.name.endswith(".router.submit"))
    by_id = {s.span_id: s for s in spans}
    # The replay is published under the workflow's root (no dependency released it).
    publish = by_id[replayed.parent_span_id]
    assert (publish.kind, publish.parent_span_id) == (PRODUCER, submit.span_id)


async def test_handlers_open_child_spans_with_the_plain_api(
    settings: FabricSettings, receiver: OtlpReceiver, extra_caps: list[str]
) -> None:
    """``trace.get_tracer(__name__)`` in a handler, async or sync: its spans are exported with the
    worker's, under the attempt span."""
    from opentelemetry import trace as otel

    agent = Agent("child-spans")
    extra_caps.extend(["t.async", "t.sync"])

    @agent.handler("t.async")
    async def in_loop(task: Task) -> int:
        with otel.get_tracer("my.handlers").start_as_current_span("async work") as span:
            span.set_attribute("work.items", 3)
        return 1

    @agent.handler("t.sync")
    def in_thread(task: Task) -> int:
        with otel.get_tracer("my.handlers").start_as_current_span("sync work"):
            return 2

    async with (
        Router(settings, telemetry=traced("fabric-router", receiver)),
        Worker(agent, settings, telemetry=traced("fabric-worker", receiver)),
        FabricClient(settings) as client,
    ):
        done = await client.run(
            {
                "tasks": [
                    {"id": "a", "capability": "t.async"},
                    {"id": "s", "capability": "t.sync", "depends_on": ["a"]},
                ]
            },
            timeout_s=60,
        )
        assert done.status == "succeeded"
    spans = receiver.spans
    await eventually(lambda: len([s for s in spans if s.name.endswith(" work")]) == 2, what="handler spans")
    by_id = {s.span_id: s for s in spans}
    assert len({s.trace_id for s in spans}) == 1
    for name, task_id in (("async work", "a"), ("sync work", "s")):
        child = next(s for s in spans if s.name == name)
        attempt = by_id[child.parent_span_id]
        assert attempt.kind == CONSUMER
        assert attempt.attributes["fabric.task.id"] == task_id
        assert child.service == "fabric-worker"
    assert next(s for s in spans if s.name == "async work").attributes["work.items"] == 3


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


DAG = [
    {"id": "a", "capability": "t.step"},
    {"id": "b", "capability": "t.flaky", "depends_on": ["a"]},
    {"id": "c", "capability": "t.step", "depends_on": ["a"]},
    {"id": "d", "capability": "t.step", "depends_on": ["b", "c"]},
    {"id": "e", "capability": "t.step"},
]


async def test_a_dead_collector_changes_nothing(
    settings: FabricSettings, extra_caps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard OTEL_* variables point at a closed port: the same DAG (a retry included) completes
    in the same time as with tracing off, and the handlers see no error."""
    agent = Agent("traced")
    extra_caps.extend(["t.step", "t.flaky"])
    errors: list[BaseException] = []

    @agent.handler("t.step")
    async def step(task: Task) -> int:
        return 1

    @agent.handler("t.flaky")
    async def flaky(task: Task) -> int:
        if task.attempt == 1:
            raise Retry("once", delay_s=1)
        return 2

    async def run(workflow_id: str, tracing: bool) -> float:
        router_telemetry, worker_telemetry = Telemetry("r"), Telemetry("w")
        assert router_telemetry.enabled is worker_telemetry.enabled is tracing
        loop = asyncio.get_running_loop()
        async with (
            Router(settings, telemetry=router_telemetry),
            Worker(agent, settings, telemetry=worker_telemetry),
            FabricClient(settings) as client,
        ):
            started = loop.time()
            try:
                done = await client.run({"workflow_id": workflow_id, "tasks": DAG}, timeout_s=60)
            except BaseException as exc:  # nothing may escape, whatever the exporter does
                errors.append(exc)
                raise
            elapsed = loop.time() - started
        assert done.status == "succeeded"
        assert {t: o.attempts for t, o in done.tasks.items()} == {"a": 1, "b": 2, "c": 1, "d": 1, "e": 1}
        return elapsed

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    untraced = await run("untraced", tracing=False)
    # The discard port: nothing listens, every export is refused.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    traced_s = await run("dead-collector", tracing=True)
    assert not errors
    # The retry tier (about 1 s) dominates both runs; a blocked exporter would add its 5 s timeouts.
    assert traced_s < untraced + max(1.0, 0.5 * untraced), (untraced, traced_s)
