"""Golden wire tests: what the router and the workers put on the broker stays the same, byte for byte.

A real router and real workers run scenarios against the real broker while a spy queue (see
tests/golden/wire.py) bound to ``{ns}.tasks``, ``{ns}.retry``, ``{ns}.events``, ``{ns}.notify``,
``{ns}.dead``, ``{ns}.alerts`` and ``{ns}.control``, and named as the submissions' ``reply_to``, records
every message. Each scenario's messages are compared with ``tests/golden/wire_<scenario>.json``: exchange,
routing key, every AMQP property, the header table in its order, the body bytes. The heartbeats, the
OpenAPI document the router serves and the AsyncAPI document are compared with their own snapshots.

Which fields are normalised (times, trace ids, pid and host, the namespace) and why: tests/golden/wire.py.

After an intended change of the wire contract, regenerate the snapshots and review their diff:

    UPDATE_GOLDEN=1 python -m pytest tests/integration/test_golden_wire.py
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fabric import Abort, Agent, Escalate, FabricClient, Reassign, Task
from fabric.asyncapi import asyncapi_document
from fabric.policy import FailFast, RetryPolicy
from fabric.protocol import codec
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.telemetry import Telemetry
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.golden.wire import GOLDEN_DIR, Message, Spy, check, dumps, scenario, updating
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq

AGENT_ID = "golden-agent"
FAILFAST_ID = "golden-failfast"
CAPABILITIES = [
    "golden.echo",
    "golden.flaky",
    "golden.reassign",
    "golden.abort",
    "golden.escalate",
    "golden.wait",
]
FAILFAST_CAPABILITIES = ["golden.failfast"]
LOST_CAPABILITIES = ["golden.lost"]
ALL_CAPABILITIES = CAPABILITIES + FAILFAST_CAPABILITIES + LOST_CAPABILITIES


def golden_agent() -> Agent:
    agent = Agent("golden")

    @agent.handler("golden.echo")
    async def echo(task: Task) -> dict[str, Any]:
        return {"input": task.input, "upstream": task.upstream}

    @agent.handler("golden.flaky")
    async def flaky(task: Task) -> int:
        if task.attempt == 1:
            raise RuntimeError("flaky on its first attempt")
        return task.attempt

    @agent.handler("golden.reassign")
    async def reassign(task: Task) -> None:
        raise Reassign("not on this agent")

    @agent.handler("golden.abort")
    async def abort(task: Task) -> None:
        raise Abort("bad_input")

    @agent.handler("golden.escalate")
    async def escalate(task: Task) -> None:
        raise Escalate("a human must look")

    @agent.handler("golden.wait")
    async def wait(task: Task) -> None:
        await asyncio.Event().wait()

    return agent


def failfast_agent() -> Agent:
    agent = Agent("golden-failfast")

    @agent.handler("golden.failfast")
    def fail(task: Task) -> None:
        raise ValueError(f"no good: {task.input}")

    return agent


def lost_agent() -> Agent:
    agent = Agent("golden-lost")

    @agent.handler("golden.lost")
    async def run(task: Task) -> int:
        return task.attempt

    return agent


#: Scenario name -> (submission, content type). Workflow ids are fixed; each runs alone, to its end.
SUBMISSIONS: dict[str, dict[str, Any]] = {
    "dag": {
        "workflow_id": "wf-dag",
        "metadata": {"owner": "golden"},
        "tasks": [
            {
                "id": "a",
                "capability": "golden.echo",
                "input": {"text": "hé", "n": 1, "f": 1.5, "list": [1, None, True]},
                "priority": 7,
                "timeout_s": 30.0,
                "max_attempts": 2,
            },
            {"id": "b", "capability": "golden.echo", "input": "b", "depends_on": ["a"]},
            {"id": "c", "capability": "golden.echo", "depends_on": ["a", "b"], "on_exhausted": "escalate"},
        ],
    },
    "retry": {
        "workflow_id": "wf-retry",
        "tasks": [{"id": "t", "capability": "golden.flaky", "input": [1, 2], "max_attempts": 3}],
    },
    "reassign": {
        "workflow_id": "wf-reassign",
        "tasks": [{"id": "t", "capability": "golden.reassign", "max_attempts": 3}],
    },
    "abort": {
        "workflow_id": "wf-abort",
        "tasks": [
            {"id": "t", "capability": "golden.abort", "input": {"k": "v"}},
            {"id": "after", "capability": "golden.echo", "depends_on": ["t"]},
        ],
    },
    "failed": {
        "workflow_id": "wf-failed",
        "tasks": [
            {"id": "t", "capability": "golden.failfast", "input": 3},
            {"id": "after", "capability": "golden.echo", "depends_on": ["t"]},
        ],
    },
    "json": {
        "workflow_id": "wf-json",
        "tasks": [{"id": "t", "capability": "golden.echo", "input": {"json": [1.25, "x"]}}],
    },
}


@pytest.fixture
async def spy(
    amqp_url: str, settings: FabricSettings, broker: AmqpConnection, extra_caps: list[str]
) -> AsyncIterator[Spy]:
    extra_caps.extend(ALL_CAPABILITIES)
    ns = settings.namespace
    await broker.declare(spec.build(ns, ALL_CAPABILITIES))
    async with Spy(amqp_url) as s:
        for capability in ALL_CAPABILITIES:
            await s.bind(names.tasks_exchange(ns), capability)
        await s.bind(names.retry_exchange(ns), "", {"x-match": "all"})
        await s.bind(names.events_exchange(ns), "#")
        await s.bind(names.notify_exchange(ns), "#")
        await s.bind(names.alerts_exchange(ns), "#")
        await s.bind(names.dead_exchange(ns))
        await s.bind(names.control_exchange(ns))
        yield s


def replacements(settings: FabricSettings, spy: Spy) -> dict[str, str]:
    return {spy.queue: "{reply_queue}", settings.namespace: "{ns}"}


async def submit(broker: AmqpConnection, settings: FabricSettings, spy: Spy, name: str) -> None:
    """Submit as a client in any language would: raw, with ``reply_to`` the spy and task notifications."""
    submission = SUBMISSIONS[name]
    content_type = codec.JSON if name == "json" else codec.MSGPACK
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode(submission, content_type),
        content_type=content_type,
        message_id=submission["workflow_id"],
        correlation_id=f"corr-{name}",
        reply_to=spy.queue,
        headers={"fabric-notify-tasks": True},
    )


def completed(spy: Spy, workflow_id: str) -> bool:
    return any(
        m.exchange == ""
        and isinstance(body := m.decoded(), dict)
        and body.get("kind") == "completed"
        and body.get("workflow_id") == workflow_id
        for m in spy.messages
    )


def event_seen(spy: Spy, workflow_id: str, status: str) -> bool:
    return any(
        m.exchange.endswith(".events")
        and m.routing_key == f"task.{status}"
        and m.decoded().get("workflow_id") == workflow_id
        for m in spy.messages
    )


async def run_scenario(
    broker: AmqpConnection, settings: FabricSettings, spy: Spy, name: str
) -> list[Message]:
    start = len(spy.messages)
    await submit(broker, settings, spy, name)
    workflow_id = SUBMISSIONS[name]["workflow_id"]
    await eventually(lambda: completed(spy, workflow_id), timeout=90, what=f"{workflow_id} completed")
    await spy.wait_quiet()
    return spy.messages[start:]


async def test_golden_wire_messages(
    broker: AmqpConnection,
    settings: FabricSettings,
    router: Router,
    start_worker: StartWorker,
    spy: Spy,
    client: FabricClient,
) -> None:
    """Task messages (router's, retried, reassigned, bounced, parked), every event kind, replies
    (accepted, rejected, completed in msgpack and JSON), task and workflow notifications, the cancel
    broadcast and an alert, per scenario, against tests/golden/wire_<scenario>.json."""
    policy = RetryPolicy({"1s": 1000}, random_fraction=lambda: 0.0)
    await start_worker(golden_agent(), agent_id=AGENT_ID, policy=policy)
    await start_worker(failfast_agent(), agent_id=FAILFAST_ID, policy=FailFast())
    replace = replacements(settings, spy)
    captured: dict[str, list[Message]] = {}
    for name in SUBMISSIONS:
        captured[name] = await run_scenario(broker, settings, spy, name)

    # Escalated, then aborted by an operator: the router parks the task message itself.
    start = len(spy.messages)
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode({"workflow_id": "wf-escalate", "tasks": [{"id": "t", "capability": "golden.escalate"}]}),
        message_id="wf-escalate",
        correlation_id="corr-escalate",
        reply_to=spy.queue,
        headers={"fabric-notify-tasks": True},
    )
    await eventually(lambda: event_seen(spy, "wf-escalate", "escalated"), timeout=60, what="escalated")
    await spy.wait_quiet()
    await client.abort("wf-escalate", "t", reason="operator said so")
    await eventually(lambda: completed(spy, "wf-escalate"), timeout=60, what="wf-escalate completed")
    await spy.wait_quiet()
    captured["escalate"] = spy.messages[start:]

    # Cancelled while running: the control broadcast and the cancelled event.
    start = len(spy.messages)
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode({"workflow_id": "wf-cancel", "tasks": [{"id": "t", "capability": "golden.wait"}]}),
        message_id="wf-cancel",
        correlation_id="corr-cancel",
        reply_to=spy.queue,
        headers={"fabric-notify-tasks": True},
    )
    await eventually(lambda: event_seen(spy, "wf-cancel", "started"), timeout=60, what="started")
    await spy.wait_quiet()
    await client.cancel("wf-cancel")
    await eventually(lambda: completed(spy, "wf-cancel"), timeout=60, what="wf-cancel completed")
    await spy.wait_quiet()
    captured["cancel"] = spy.messages[start:]

    # Refused: a cycle. Only the rejected reply.
    start = len(spy.messages)
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode(
            {
                "workflow_id": "wf-cycle",
                "tasks": [
                    {"id": "x", "capability": "golden.echo", "depends_on": ["y"]},
                    {"id": "y", "capability": "golden.echo", "depends_on": ["x"]},
                ],
            }
        ),
        message_id="wf-cycle",
        correlation_id="corr-cycle",
        reply_to=spy.queue,
    )
    await eventually(lambda: len(spy.messages) > start, timeout=30, what="the rejected reply")
    await spy.wait_quiet()
    captured["rejected"] = spy.messages[start:]

    # A lost attempt: a consumer took the task message and gave it back unsettled (as when its worker
    # dies); the worker that gets it redelivered counts the attempt lost and retries it.
    start = len(spy.messages)
    await broker.publish(
        names.submit_exchange(settings.namespace),
        names.SUBMIT_ROUTING_KEY,
        codec.encode({"workflow_id": "wf-lost", "tasks": [{"id": "t", "capability": "golden.lost"}]}),
        message_id="wf-lost",
        correlation_id="corr-lost",
        reply_to=spy.queue,
        headers={"fabric-notify-tasks": True},
    )
    await spy.take_back(names.capability_queue(settings.namespace, "golden.lost"))
    await start_worker(lost_agent(), agent_id="golden-lost", policy=policy)
    await eventually(lambda: completed(spy, "wf-lost"), timeout=60, what="wf-lost completed")
    await spy.wait_quiet()
    captured["lost"] = spy.messages[start:]

    for name, messages in captured.items():
        check(f"wire_{name}.json", scenario(messages, replace))


async def test_golden_wire_messages_traced(
    broker: AmqpConnection, settings: FabricSettings, spy: Spy
) -> None:
    """With tracing on: the trace context on task messages and events, the links of a task with several
    dependencies and the previous attempt of a retry, against tests/golden/wire_traced_<scenario>.json."""
    policy = RetryPolicy({"1s": 1000}, random_fraction=lambda: 0.0)
    replace = replacements(settings, spy)
    async with (
        Router(settings, telemetry=traced("fabric-router")),
        Worker(golden_agent(), worker_settings(settings, AGENT_ID), policy=policy, telemetry=traced("w")),
    ):
        for name in ("dag", "retry"):
            check(
                f"wire_traced_{name}.json", scenario(await run_scenario(broker, settings, spy, name), replace)
            )


def traced(name: str) -> Telemetry:
    return Telemetry(name, enabled=True, exporter=InMemorySpanExporter())


def worker_settings(settings: FabricSettings, agent_id: str) -> FabricSettings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"agent_id": agent_id})})


async def test_golden_heartbeats(
    amqp_url: str,
    settings: FabricSettings,
    start_worker: StartWorker,
    broker: AmqpConnection,
    extra_caps: list[str],
) -> None:
    """A worker's first heartbeat and its last (``stopped``) one: tests/golden/wire_heartbeats.json."""
    extra_caps.extend(FAILFAST_CAPABILITIES)
    await broker.declare(spec.core(settings.namespace))
    async with Spy(amqp_url) as beats:
        await beats.bind(names.heartbeats_exchange(settings.namespace))
        worker = await start_worker(failfast_agent(), agent_id=FAILFAST_ID, concurrency=3)
        await eventually(lambda: beats.messages, timeout=30, what="a heartbeat")
        first = beats.messages[0]
        await worker.drain(timeout_s=5)
        await eventually(
            lambda: [m for m in beats.messages if m.decoded()["health"] == "stopped"],
            timeout=30,
            what="the last heartbeat",
        )
        last = next(m for m in beats.messages if m.decoded()["health"] == "stopped")
    replace = {settings.namespace: "{ns}"}
    check("wire_heartbeats.json", [scenario([first], replace)[0], scenario([last], replace)[0]])


async def test_golden_openapi_document(router: Router) -> None:
    """The OpenAPI document the router serves, byte for byte, against tests/golden/openapi.json."""
    assert router.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as http:
        response = await http.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    # The snapshot is indented for review; the served bytes are the compact form of the same document.
    assert response.content == json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    check("openapi.json", document)


def test_golden_asyncapi_document() -> None:
    """The AsyncAPI document, against tests/golden/asyncapi.json."""
    check("asyncapi.json", asyncapi_document("fabric"))


def test_golden_files_are_the_written_form() -> None:
    """Every golden file is exactly what :func:`dumps` writes (no hand edits that only look alike)."""
    if updating():
        pytest.skip("writing the golden files")
    files = sorted(GOLDEN_DIR.glob("*.json"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert text == dumps(json.loads(text)), path.name
