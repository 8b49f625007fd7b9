"""The router's REST API (docs/protocol.md §12) against an in-process router on the real broker.

HTTP submissions are compared with AMQP submissions of the same bodies in the same test: the outcome
(accepted, the rejection reason and detail, idempotency) must be the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import msgpack
import pytest
from openapi_spec_validator import validate

from fabric import FabricClient
from fabric.errors import ConfigError
from fabric.router.http.api import REJECTION_STATUS
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.topology import spec
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from tests.integration.test_rejections import CASES, RawClient, js, task
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq

JSON = {"content-type": "application/json"}


@pytest.fixture
async def raw(settings: FabricSettings, router: Router) -> AsyncIterator[RawClient]:
    """Submits over plain AMQP (aio-pika), as a non-Python client would."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True)
    yield RawClient(channel, queue, settings.namespace)
    await connection.close()


@pytest.fixture
async def http(router: Router) -> AsyncIterator[httpx.AsyncClient]:
    assert router.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as client:
        yield client


async def post(
    http: httpx.AsyncClient, body: bytes, key: str | None = None, **headers: str
) -> httpx.Response:
    sent = {**JSON, **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    return await http.post("/api/v1/workflows", content=body, headers=sent)


# -- submission: the same outcomes as AMQP ----------------------------------------------------------


async def test_http_submission_accepted_idempotent_and_conflict_as_on_amqp(
    http: httpx.AsyncClient, raw: RawClient, router: Router, start_worker: StartWorker
) -> None:
    body = js({"tasks": [task("a", input=1), task("b", "a", input=2)]})

    # Accepted over HTTP, then the same body with the key as AMQP message_id: the same workflow.
    first = await post(http, body, key="order-1")
    assert first.status_code == 202, first.text
    accepted = first.json()
    assert accepted["kind"] == "accepted"
    assert accepted["tasks"] == 2
    assert first.headers["location"] == f"/api/v1/workflows/{accepted['workflow_id']}"
    assert "idempotent-replayed" not in first.headers
    over_amqp = await raw.submit(body, "application/json", message_id="order-1")
    assert over_amqp == accepted
    again = await post(http, body, key="order-1")
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (202, accepted, "true")

    # Accepted over AMQP first, then over HTTP with the message id as Idempotency-Key.
    amqp_first = await raw.submit(body, "application/json", message_id="order-2")
    assert amqp_first["kind"] == "accepted"
    http_second = await post(http, body, key="order-2")
    assert (http_second.status_code, http_second.json()) == (202, amqp_first)

    # A client workflow_id: the same id with another body is a conflict, over either transport.
    mine = js({"workflow_id": "mine-1", "tasks": [task("a")]})
    assert (await post(http, mine)).json() == await raw.submit(mine, "application/json", message_id="m-1")
    other = js({"workflow_id": "mine-1", "tasks": [task("z")]})
    refused = await post(http, other)
    assert refused.status_code == 409
    assert refused.json() == await raw.submit(other, "application/json", message_id="m-2")
    assert refused.json()["reason"] == "conflict"

    # Nothing was created twice: three workflows in all; without a key every POST is a new workflow.
    page = (await http.get("/api/v1/workflows")).json()
    assert sorted(w["workflow_id"] for w in page["items"]) == sorted(
        [accepted["workflow_id"], amqp_first["workflow_id"], "mine-1"]
    )
    assert (await post(http, body)).json()["workflow_id"] != (await post(http, body)).json()["workflow_id"]

    # And the accepted workflow runs: its tasks were queued before the 202.
    await start_worker(demo)

    async def finished() -> dict[str, Any] | None:
        doc = (await http.get(f"/api/v1/workflows/{accepted['workflow_id']}")).json()
        return doc if doc["kind"] == "completed" else None

    done = await eventually(finished, what="the HTTP-submitted workflow to finish")
    assert done["status"] == "succeeded"
    assert (done["tasks"]["a"]["result"], done["tasks"]["b"]["result"]) == (1, 2)
    # A resend of a finished workflow is still the same accepted answer.
    late = await post(http, body, key="order-1")
    assert (late.status_code, late.json()) == (202, accepted)


@pytest.mark.parametrize(
    ("label", "body", "content_type", "reason", "mention"), CASES, ids=[c[0] for c in CASES]
)
async def test_http_rejection_is_the_amqp_rejection(
    http: httpx.AsyncClient,
    raw: RawClient,
    router: Router,
    label: str,
    body: bytes,
    content_type: str | None,
    reason: str,
    mention: str,
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await http.post("/api/v1/workflows", content=body, headers=headers)
    over_amqp = await raw.submit(body, content_type, message_id=f"bad-{label}")
    assert over_amqp["reason"] == reason
    assert response.json() == over_amqp  # kind, reason, detail, errors, workflow_id: all the same
    assert response.status_code == REJECTION_STATUS[over_amqp["reason"]]
    assert 400 <= response.status_code < 500
    assert await router.store.list_workflows() == []


async def test_http_cycle_names_the_cycle(http: httpx.AsyncClient, raw: RawClient) -> None:
    body = js({"tasks": [task("a", "c"), task("b", "a"), task("c", "b")]})
    response = await post(http, body, key="cyc")
    assert response.status_code == 422
    assert response.json()["reason"] == "cycle"
    assert response.json()["detail"] == "dependency cycle: a -> b -> c -> a"
    assert response.json() == await raw.submit(body, "application/json", message_id="cyc")


async def test_http_msgpack_submission_and_oversize_body(
    http: httpx.AsyncClient, settings: FabricSettings
) -> None:
    body = msgpack.packb({"tasks": [{"id": "bin", "capability": "demo.echo", "input": b"\x00\x01"}]})
    response = await http.post(
        "/api/v1/workflows", content=body, headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 202, response.text
    limit = settings.router.max_body_bytes
    big = js({"tasks": [task("a", input="x" * limit)]})
    response = await post(http, big)
    assert response.status_code == 413
    assert response.json()["reason"] == "too_large"
    assert f"the limit is {limit}" in response.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    streamed = await http.post("/api/v1/workflows", content=chunks(), headers=JSON)
    assert streamed.status_code == 413
    assert streamed.json()["detail"] == f"body is more than {limit} bytes; the limit is {limit}"
    assert (await post(http, b"", key="k")).json()["reason"] == "malformed"


# -- reads -----------------------------------------------------------------------------------------


async def test_get_and_list_with_filters_and_pages(
    http: httpx.AsyncClient, client: FabricClient, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    started = time.time()
    ok = [await client.run({"tasks": [task(f"t{n}", input=n)]}, timeout_s=60) for n in range(3)]
    middle = time.time()
    failed = await client.run(
        {
            "workflow_id": "wf-fails",
            "metadata": {"team": "search"},
            "tasks": [
                {"id": "f", "capability": "demo.fail", "input": "nope", "max_attempts": 1},
                {"id": "s", "capability": "demo.sum", "input": 1, "depends_on": ["f"]},
            ],
        },
        timeout_s=60,
    )
    assert failed.status == "failed"
    ids = [d.workflow_id for d in ok]

    listed = (await http.get("/api/v1/workflows")).json()
    assert [w["workflow_id"] for w in listed["items"]] == ["wf-fails", *reversed(ids)]
    assert listed["next_cursor"] is None

    async def pages(query: str) -> list[str]:
        found: list[str] = []
        cursor = None
        while True:
            params = f"{query}&cursor={cursor}" if cursor else query
            page = (await http.get(f"/api/v1/workflows?{params}")).json()
            assert len(page["items"]) <= int(query.split("limit=")[1].split("&")[0])
            found += [w["workflow_id"] for w in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return found

    assert await pages("limit=1") == ["wf-fails", *reversed(ids)]
    assert await pages("limit=1&status=succeeded") == list(reversed(ids))
    assert await pages("limit=1&status=failed") == ["wf-fails"]
    assert await pages("limit=1&capability=demo.sum") == ["wf-fails"]
    assert await pages("limit=1&capability=demo.echo") == list(reversed(ids))
    assert await pages(f"limit=1&until={middle}") == list(reversed(ids))
    assert await pages(f"limit=1&since={middle}&status=failed") == ["wf-fails"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 60)) + "Z"
    assert await pages(f"limit=2&since={iso}&status=succeeded") == list(reversed(ids))
    assert await pages("limit=1&status=cancelled") == []

    detail = (await http.get("/api/v1/workflows/wf-fails")).json()
    assert (detail["kind"], detail["status"], detail["metadata"]) == (
        "completed",
        "failed",
        {"team": "search"},
    )
    assert detail["counts"] == {"dead": 1, "upstream_failed": 1}
    f = detail["tasks"]["f"]
    assert (f["status"], f["attempts"], f["capability"], f["error"]["type"]) == (
        "dead",
        1,
        "demo.fail",
        "ValueError",
    )
    assert f["history"][0]["attempt"] == 1
    assert f["history"][0]["error"] == {"type": "ValueError", "message": "nope"}
    assert f["started_at"] <= f["finished_at"]
    assert detail["tasks"]["s"]["depends_on"] == ["f"]
    assert detail["tasks"]["s"]["status"] == "upstream_failed"
    # The completed document of docs/protocol.md §3 is contained in it.
    for task_id, outcome in failed.tasks.items():
        assert detail["tasks"][task_id]["status"] == outcome.status
        assert detail["tasks"][task_id]["attempts"] == outcome.attempts

    assert (await http.get(f"/api/v1/workflows/{ids[0]}")).json()["tasks"]["t0"]["result"] == 0

    # Dead tasks, from the store; the broker's count of the parking queue beside them.
    dead = (await http.get("/api/v1/dead")).json()
    assert [(d["workflow_id"], d["task_id"], d["capability"]) for d in dead["items"]] == [
        ("wf-fails", "f", "demo.fail")
    ]
    assert dead["items"][0]["error"] == {"type": "ValueError", "message": "nope"}
    assert dead["queue"]["messages"] == 1
    assert (await http.get("/api/v1/dead?capability=demo.echo")).json()["items"] == []
    assert (await http.get(f"/api/v1/dead?until={started}")).json()["items"] == []

    agents = (await http.get("/api/v1/agents")).json()["items"]
    assert len(agents) == 1
    assert agents[0]["state"] == "alive"
    assert "demo.echo" in agents[0]["capabilities"]
    assert (await http.get("/api/v1/agents?state=lost")).json()["items"] == []
    assert (await http.get("/api/v1/agents?capability=nobody.has")).json()["items"] == []

    stats = (await http.get("/api/v1/stats")).json()
    assert stats["counters"]["accepted"] == 4
    assert stats["agents"] == {"alive": 1, "unhealthy": 0, "lost": 0, "stopped": 0}
    assert stats["queues"]["demo.echo"]["consumers"] == 1
    assert stats["dead"]["messages"] == 1
    assert stats["active"] is True


async def test_cancel_over_http(http: httpx.AsyncClient, client: FabricClient, router: Router) -> None:
    # No worker: the tasks wait in the queue until cancelled.
    accepted = await client.submit(
        {"workflow_id": "to-cancel", "tasks": [task("a"), task("b", "a"), task("c")]}
    )
    assert accepted.tasks == 3
    why = (await http.get("/api/v1/workflows/to-cancel/why")).json()["items"]
    assert {w["task_id"]: w["reason"] for w in why} == {"a": "no_agent", "b": "waiting_on", "c": "no_agent"}
    assert next(w for w in why if w["task_id"] == "b")["waiting_on"] == ["a"]
    only = (await http.get("/api/v1/workflows/to-cancel/why?task=b")).json()["items"]
    assert [w["task_id"] for w in only] == ["b"]
    assert (await http.get("/api/v1/workflows/to-cancel/why?task=zz")).status_code == 404
    one = await http.post("/api/v1/workflows/to-cancel/cancel?task=a")
    assert one.status_code == 200, one.text
    assert one.json() == {"workflow_id": "to-cancel", "cancelled": ["a", "b"], "status": "running"}
    rest = (await http.post("/api/v1/workflows/to-cancel/cancel")).json()
    assert rest == {"workflow_id": "to-cancel", "cancelled": ["c"], "status": "cancelled"}
    again = (await http.post("/api/v1/workflows/to-cancel/cancel")).json()
    assert again == {"workflow_id": "to-cancel", "cancelled": [], "status": "cancelled"}
    detail = (await http.get("/api/v1/workflows/to-cancel")).json()
    assert {t: d["status"] for t, d in detail["tasks"].items()} == {
        "a": "cancelled",
        "b": "cancelled",
        "c": "cancelled",
    }
    missing = await http.post("/api/v1/workflows/nope/cancel")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    no_task = await http.post("/api/v1/workflows/to-cancel/cancel?task=zz")
    assert no_task.status_code == 404
    assert "zz" in no_task.json()["detail"]


# -- bad input, health -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "mention"),
    [
        ("/api/v1/workflows?limit=0", 400, "limit"),
        ("/api/v1/workflows?limit=5000", 400, "limit"),
        ("/api/v1/workflows?limit=many", 400, "limit"),
        ("/api/v1/workflows?status=sleeping", 400, "status"),
        ("/api/v1/workflows?capability=Not%20Valid", 400, "capability"),
        ("/api/v1/workflows?since=yesterday", 400, "since"),
        ("/api/v1/workflows?cursor=garbage", 400, "cursor"),
        ("/api/v1/dead?cursor=WzEsImEiXQ", 400, "cursor"),
        ("/api/v1/agents?state=dead", 400, "state"),
        ("/api/v1/workflows/has%20space", 400, "workflow_id"),
        ("/api/v1/workflows/unknown", 404, "unknown"),
        ("/api/v2/workflows", 404, "/api/v2/workflows"),
    ],
)
async def test_bad_requests_name_the_problem(
    http: httpx.AsyncClient, path: str, status: int, mention: str
) -> None:
    response = await http.get(path)
    assert response.status_code == status, response.text
    problem = response.json()
    assert set(problem) == {"error", "detail", "errors"}
    assert mention in problem["detail"], problem
    assert (await http.get("/healthz")).status_code == 200


async def test_wrong_method_and_bad_idempotency_key(http: httpx.AsyncClient) -> None:
    response = await http.delete("/api/v1/workflows")
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}
    response = await post(http, js({"tasks": [task("a")]}), key="k" * 256)
    assert response.status_code == 422
    assert (response.json()["kind"], response.json()["reason"]) == ("rejected", "invalid")
    assert "idempotency-key" in response.json()["detail"].lower()


async def test_health_answers_while_submissions_pour_in(http: httpx.AsyncClient, router: Router) -> None:
    """Health and readiness keep answering (fast) while the router admits a burst of HTTP submissions."""
    burst = [post(http, js({"tasks": [task(f"t{i}") for i in range(200)]})) for _ in range(20)]
    submitting = asyncio.gather(*burst)
    latencies = []
    while not submitting.done():
        begun = time.monotonic()
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        latencies.append(time.monotonic() - begun)
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
    assert all(r.status_code == 202 for r in await submitting)
    assert latencies
    assert max(latencies) < 5
    metrics = await http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "fabric_workflows_submitted_total" in metrics.text


async def test_kept_alive_connections_answer_without_delayed_ack_stalls(http: httpx.AsyncClient) -> None:
    """Nagle plus delayed ACKs put a 40 ms floor under every answer on a kept-alive connection unless the
    server sets TCP_NODELAY; on loopback an answer takes a few milliseconds."""
    times = []
    for _ in range(25):
        begun = time.perf_counter()
        assert (await http.get("/healthz")).status_code == 200
        times.append(time.perf_counter() - begun)
    assert statistics.median(times) < 0.03, times


async def test_a_port_in_use_is_a_clear_error(settings: FabricSettings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})})
        with pytest.raises(ConfigError, match=f"FABRIC_HTTP__PORT: cannot listen on 127.0.0.1:{port}"):
            async with Router(busy):
                pass


# -- the OpenAPI document ---------------------------------------------------------------------------


async def test_favicon_is_served(http: httpx.AsyncClient) -> None:
    response = await http.get("/favicon.ico")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/x-icon"
    assert response.content.startswith(b"\x00\x00\x01\x00"), "an ICO file"
    assert b"PNG" in response.content[:40]


async def test_openapi_document_is_valid_and_complete(http: httpx.AsyncClient) -> None:
    document = (await http.get("/api/v1/openapi.json")).json()
    validate(document)
    paths = document["paths"]
    assert set(paths) >= {
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/workflows",
        "/api/v1/workflows/{workflow_id}",
        "/api/v1/workflows/{workflow_id}/cancel",
        "/api/v1/workflows/{workflow_id}/why",
        "/api/v1/agents",
        "/api/v1/dead",
        "/api/v1/stats",
        "/api/v1/alerts",
        "/api/v1/escalated",
    }
    assert set(paths["/api/v1/workflows"]) == {"get", "post"}
    schemas = document["components"]["schemas"]
    # The submission schema is the wire model's, so it names the same limits as admission.
    assert schemas["TaskSpec"]["properties"]["priority"]["maximum"] == 9
    post_responses = paths["/api/v1/workflows"]["post"]["responses"]
    assert {"202", "400", "409", "413", "415", "422"} <= set(post_responses)
    assert "HTTPValidationError" not in json.dumps(document)


@pytest.mark.timeout(600)
async def test_schemathesis_finds_no_contract_violation(
    router: Router, settings: FabricSettings, broker: AmqpConnection, tmp_path: Path
) -> None:
    """Property-based requests against every operation: no 5xx, every status, header and body as the
    document says. ``make api-fuzz`` runs it with many more examples (API_FUZZ_EXAMPLES)."""
    url = f"http://127.0.0.1:{router.http_port}/api/v1/openapi.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url,
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance,use_after_free,ensure_resource_availability",
        "--max-examples",
        os.environ.get("API_FUZZ_EXAMPLES", "25"),
        "--workers",
        "1",
        "--suppress-health-check",
        "all",
        "--generation-database",
        "none",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its cache and reports stay out of the working tree
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 500)
    finally:
        # Generated submissions declare queues for generated capabilities: delete them.
        workflows = await router.store.list_workflows(limit=100_000)
        capabilities = {c for w in workflows for c in w.capabilities}
        await broker.delete(spec.build(settings.namespace, sorted(capabilities)))
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert workflows, "schemathesis submitted no valid workflow"
