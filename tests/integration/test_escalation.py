"""Escalation on the real broker: a handler's Escalate (or a policy that gives up) stops the task for an
operator, an alert reaches {ns}.alerts and the webhooks, and `resume`/`abort` finish the story."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import Agent, Escalate, FabricClient, RequestRefused, Task
from fabric.protocol import headers
from fabric.protocol.messages import AlertStatus
from fabric.router.service import Router
from fabric.settings import AlertSettings, CapabilityPolicy, FabricSettings, PolicySettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.integration.conftest import AlertQueue, StartWorker
from tests.webhook import WebhookServer

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def hooks() -> AsyncIterator[WebhookServer]:
    async with WebhookServer() as server:
        yield server


def with_alerts(settings: FabricSettings, *urls: str, **alerts: Any) -> FabricSettings:
    return settings.model_copy(update={"alerts": AlertSettings(webhooks=list(urls), **alerts)})  # type: ignore[arg-type]


def review_agent(runs: Counter[str], *, escalate_times: int | None = None) -> Agent:
    """``t.review`` escalates unless its input is ``{"approved": true}`` (or after ``escalate_times``
    escalations); ``t.after`` returns what it got from upstream."""
    agent = Agent("reviewer")

    @agent.handler("t.review")
    async def review(task: Task) -> Any:
        runs[task.task_id] += 1
        approved = isinstance(task.input, dict) and task.input.get("approved") is True
        if escalate_times is not None:
            approved = runs[task.task_id] > escalate_times
        if not approved:
            raise Escalate(f"please check {task.task_id}")
        return {"reviewed": task.input}

    @agent.handler("t.after")
    async def after(task: Task) -> Any:
        runs[task.task_id] += 1
        return task.upstream

    return agent


DIAMOND = {
    "tasks": [
        {"id": "review", "capability": "t.review", "input": {"doc": 1}},
        {"id": "after", "capability": "t.after", "depends_on": ["review"]},
        {"id": "side", "capability": "t.after"},
    ]
}


async def escalated(client: FabricClient, workflow_id: str, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status = await client.status(workflow_id)
        task: dict[str, Any] = status["tasks"][task_id]
        return status if task["status"] == "escalated" else None

    result: dict[str, Any] = await eventually(check, what=f"{task_id} escalated")
    return result


async def test_escalate_alerts_the_broker_and_a_webhook_and_resume_with_a_new_input_completes(
    settings: FabricSettings,
    client: FabricClient,
    start_worker: StartWorker,
    extra_caps: list[str],
    alert_queue: AlertQueue,
    hooks: WebhookServer,
) -> None:
    extra_caps.extend(["t.review", "t.after"])
    runs: Counter[str] = Counter()
    await start_worker(review_agent(runs))
    async with Router(with_alerts(settings, hooks.url("/alerts"))) as router:
        accepted = await client.submit({"workflow_id": "esc-1", **DIAMOND})
        status = await escalated(client, accepted.workflow_id, "review")
        key = "task.escalated:esc-1/review"

        # The alert, on the broker and at the webhook.
        ((routing_key, alert),) = await eventually(lambda: alert_queue.of(key), what="alert on {ns}.alerts")
        assert routing_key == "alert.critical.task.escalated"
        assert alert.kind == "task.escalated"
        assert alert.namespace == settings.namespace
        assert alert.labels["workflow_id"] == "esc-1"
        assert alert.labels["task_id"] == "review"
        assert alert.labels["capability"] == "t.review"
        assert alert.labels["reason"] == "requested"
        assert alert.data["error"] == {"type": "Escalate", "message": "please check review"}
        assert "fabric resume esc-1 --task review" in alert.detail
        (posted,) = await eventually(lambda: hooks.at("/alerts"), what="alert at the webhook")
        assert posted.headers["content-type"] == "application/json"
        assert posted.body == alert.model_dump(mode="json")

        # Stopped for an operator: the dependent waits, the rest finishes, the workflow stays open.
        status = await eventually(
            lambda: _when(client.status("esc-1"), lambda s: s["tasks"]["side"]["status"] == "succeeded"),
            what="the independent task finished",
        )
        assert status["status"] == "running"
        assert status["tasks"]["after"]["status"] == "waiting"
        assert status["tasks"]["review"]["escalation"]["reason"] == "requested"
        assert runs["review"] == 1, "an escalated task is not retried"
        (why,) = await client.why("esc-1", "review")
        assert why["reason"] == "escalated"
        assert why["escalation_reason"] == "requested"
        assert "please check review" in why["detail"]
        assert {a["task_id"]: a["reason"] for a in await client.why("esc-1")} == {
            "review": "escalated",
            "after": "waiting_on",
        }
        assert await client.result("esc-1") is None

        # Resume with a new input: it runs again from attempt 1 and the workflow completes.
        answer = await client.resume("esc-1", "review", input={"approved": True, "by": "ops"})
        assert answer == {"workflow_id": "esc-1", "task_id": "review", "status": "queued", "new_input": True}
        done = await client.wait("esc-1", timeout_s=60)
        assert done.status == "succeeded"
        assert done.tasks["review"].result == {"reviewed": {"approved": True, "by": "ops"}}
        assert done.tasks["review"].attempts == 1
        assert done.tasks["after"].result == {"review": {"reviewed": {"approved": True, "by": "ops"}}}
        history = (await client.status("esc-1"))["tasks"]["review"]["history"]
        assert [(h["agent"] == "operator", h["error"]["type"]) for h in history] == [
            (False, "Escalate"),
            (True, "Resumed"),
        ]
        assert history[1]["input"] == {"approved": True, "by": "ops"}

        # One resolved alert, with the same key, on both channels.
        ((_, resolved),) = await eventually(
            lambda: alert_queue.of(key, AlertStatus.RESOLVED), what="resolved alert"
        )
        assert resolved.labels == alert.labels
        assert resolved.alert_id != alert.alert_id
        await eventually(lambda: len(hooks.at("/alerts")) == 2, what="resolved alert at the webhook")
        assert hooks.at("/alerts")[1].body["status"] == "resolved"
        assert len(alert_queue.of(key)) == 1, "the condition fired once"
        assert router.alerts.stats["failed"] == 0
        metrics = router.render_metrics()
        assert 'fabric_tasks_escalated_total{capability="t.review"} 1.0' in metrics
        for event, count in {"fired": 1, "resolved": 1, "published": 2, "delivered": 2}.items():
            assert f'fabric_alerts_total{{event="{event}"}} {count}.0' in metrics
        assert "fabric_alerts_firing 0.0" in metrics


async def _when(coro: Any, predicate: Any) -> Any:
    value = await coro
    return value if predicate(value) else None


async def test_resume_without_a_new_input_runs_the_same_input_with_a_fresh_attempt_budget(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.extend(["t.review", "t.after"])
    runs: Counter[str] = Counter()
    await start_worker(review_agent(runs, escalate_times=1))
    await client.submit({"workflow_id": "esc-2", **DIAMOND})
    await escalated(client, "esc-2", "review")
    await client.resume("esc-2", "review")
    done = await client.wait("esc-2", timeout_s=60)
    assert done.status == "succeeded"
    assert done.tasks["review"].result == {"reviewed": {"doc": 1}}
    assert runs["review"] == 2
    history = (await client.status("esc-2"))["tasks"]["review"]["history"]
    assert history[-1]["error"]["type"] == "Resumed"
    assert "input" not in history[-1]


async def test_abort_parks_the_task_fails_its_dependents_and_ends_the_workflow(
    settings: FabricSettings,
    client: FabricClient,
    router: Router,
    start_worker: StartWorker,
    extra_caps: list[str],
    broker: AmqpConnection,
    alert_queue: AlertQueue,
) -> None:
    extra_caps.extend(["t.review", "t.after"])
    await start_worker(review_agent(Counter()))
    await client.submit({"workflow_id": "esc-3", **DIAMOND})
    await escalated(client, "esc-3", "review")
    await eventually(lambda: alert_queue.of("task.escalated:esc-3/review"), what="alert")

    answer = await client.abort("esc-3", "review", reason="the document is gone")
    assert answer["status"] == "dead"
    assert answer["upstream_failed"] == ["after"]
    done = await client.wait("esc-3", timeout_s=30)
    assert done.status == "failed"
    assert done.tasks["review"].status == "dead"
    assert done.tasks["review"].error is not None
    assert (done.tasks["review"].error.type, done.tasks["review"].error.message) == (
        "Aborted",
        "the document is gone",
    )
    assert done.tasks["after"].status == "upstream_failed"
    assert done.tasks["side"].status == "succeeded"
    await eventually(
        lambda: alert_queue.of("task.escalated:esc-3/review", AlertStatus.RESOLVED), what="resolved alert"
    )
    # A copy is parked, so `fabric dead replay` can run it again.
    async with broker.browse(names.dead_queue(settings.namespace), limit=10) as parked:
        (copy,) = parked
        assert headers.get_str(copy.headers, headers.DEAD_REASON) == "the document is gone"
        assert headers.get_str(copy.headers, headers.TASK_ID) == "review"
        assert headers.get_str(copy.headers, headers.ORIGINAL_ROUTING_KEY) == "t.review"


async def test_resume_or_abort_of_a_task_that_is_not_escalated_is_refused(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.extend(["t.review", "t.after"])
    await start_worker(review_agent(Counter()))
    await client.submit({"workflow_id": "esc-4", **DIAMOND})
    await escalated(client, "esc-4", "review")
    for command in (client.resume, client.abort):
        with pytest.raises(RequestRefused, match="is waiting, not escalated") as refused:
            await command("esc-4", "after")
        assert not refused.value.not_found
        with pytest.raises(RequestRefused, match="no task 'nope'") as missing:
            await command("esc-4", "nope")
        assert missing.value.not_found
    # Nothing changed: still escalated, still resumable once.
    await client.resume("esc-4", "review", input={"approved": True})
    with pytest.raises(RequestRefused, match="not escalated"):
        await client.resume("esc-4", "review")
    assert (await client.wait("esc-4", timeout_s=60)).status == "succeeded"


async def test_out_of_attempts_escalates_when_the_task_or_its_capability_says_so(
    settings: FabricSettings,
    client: FabricClient,
    start_worker: StartWorker,
    extra_caps: list[str],
    alert_queue: AlertQueue,
) -> None:
    extra_caps.extend(["t.broken", "t.broken2"])
    agent = Agent("broken")
    runs: Counter[str] = Counter()

    @agent.handler("t.broken")
    async def broken(task: Task) -> None:
        runs[task.task_id] += 1
        raise RuntimeError(f"attempt {task.attempt} broke")

    @agent.handler("t.broken2")
    async def broken2(task: Task) -> None:
        runs[task.task_id] += 1
        raise RuntimeError(f"attempt {task.attempt} broke")

    await start_worker(agent)
    policy = PolicySettings(
        capabilities={"t.broken2": CapabilityPolicy(on_exhausted="escalate", max_attempts=1)}
    )  # type: ignore[arg-type]
    async with Router(settings.model_copy(update={"policy": policy})):
        await client.submit(
            {
                "workflow_id": "esc-5",
                "tasks": [
                    {
                        "id": "by-task",
                        "capability": "t.broken",
                        "max_attempts": 2,
                        "on_exhausted": "escalate",
                    },
                    {"id": "by-capability", "capability": "t.broken2"},
                    {"id": "parked", "capability": "t.broken", "max_attempts": 1},
                ],
            }
        )
        status = await escalated(client, "esc-5", "by-task")
        status = await escalated(client, "esc-5", "by-capability")
        tasks = status["tasks"]
        assert (tasks["by-task"]["attempts"], runs["by-task"]) == (2, 2)
        assert tasks["by-task"]["escalation"]["reason"] == "exhausted"
        assert tasks["by-task"]["error"] == {"type": "RuntimeError", "message": "attempt 2 broke"}
        assert (tasks["by-capability"]["attempts"], runs["by-capability"]) == (1, 1)
        await eventually(
            lambda: _when(client.status("esc-5"), lambda s: s["tasks"]["parked"]["status"] == "dead"),
            what="the default (park) for the third task",
        )
        ((_, alert),) = await eventually(
            lambda: alert_queue.of("task.escalated:esc-5/by-task"), what="alert of the exhausted task"
        )
        assert alert.labels["reason"] == "exhausted"


async def test_a_webhook_failing_twice_then_succeeding_gets_the_alert_on_the_third_try(
    settings: FabricSettings,
    client: FabricClient,
    start_worker: StartWorker,
    extra_caps: list[str],
    hooks: WebhookServer,
) -> None:
    extra_caps.extend(["t.review", "t.after"])
    hooks.fail_first("/flaky", 2, status=503)
    await start_worker(review_agent(Counter()))
    configured = with_alerts(
        settings, hooks.url("/flaky"), hooks.url("/ok"), webhook_retries=3, webhook_backoff_s=0.2
    )
    async with Router(configured) as router:
        await client.submit({"workflow_id": "esc-6", **DIAMOND})
        await escalated(client, "esc-6", "review")
        tries = await eventually(lambda: _nonempty(hooks.at("/flaky"), 3), what="three tries")
        assert len({r.body["alert_id"] for r in tries}) == 1, "every try carries the same alert"
        assert tries[2].at - tries[1].at >= 0.35, "the second retry waits twice the backoff"
        assert len(hooks.at("/ok")) == 1, "a healthy webhook gets it once"
        await eventually(lambda: router.alerts.stats["delivered"] == 2, what="both deliveries counted")
        assert router.alerts.stats["failed"] == 0


def _nonempty(items: list[Any], count: int) -> list[Any] | None:
    return items if len(items) >= count else None


async def test_a_hanging_webhook_times_out_while_the_router_keeps_completing_workflows(
    settings: FabricSettings,
    client: FabricClient,
    start_worker: StartWorker,
    extra_caps: list[str],
    hooks: WebhookServer,
    alert_queue: AlertQueue,
) -> None:
    from workers.demo import agent as demo_agent

    extra_caps.extend(["t.review", "t.after"])
    hooks.hang("/hang")
    await start_worker(review_agent(Counter()))
    await start_worker(demo_agent, concurrency=8)
    configured = with_alerts(
        settings, hooks.url("/hang"), webhook_timeout_s=3, webhook_retries=1, webhook_backoff_s=0.5
    )
    async with Router(configured) as router:
        for i in range(3):
            await client.submit({"workflow_id": f"esc-7-{i}", **DIAMOND})
        for i in range(3):
            await escalated(client, f"esc-7-{i}", "review")
        await eventually(lambda: hooks.at("/hang"), what="the webhook hanging on the first alert")
        hung_since = time.monotonic()
        # Meanwhile the router's event processing is not held up by alert delivery.
        started = time.monotonic()
        done = await asyncio.gather(
            *(
                client.run({"tasks": [{"id": "a", "capability": "demo.echo", "input": i}]}, timeout_s=30)
                for i in range(20)
            )
        )
        elapsed = time.monotonic() - started
        assert all(d.status == "succeeded" for d in done)
        assert router.alerts.stats["failed"] == 0, "the webhook has not even timed out yet"
        assert elapsed < 3, f"20 workflows took {elapsed:.1f}s behind a hanging webhook"
        # The broker got every alert at once: only the hanging webhook's own queue waits on it.
        assert len(alert_queue.alerts) == 3
        # It costs each alert its timeout per try, then it is given up (logged, counted).
        await eventually(lambda: router.alerts.stats["failed"] >= 1, timeout=15, what="the first give-up")
        assert time.monotonic() - hung_since >= 2, "given up only after the timeout of the second try"
        assert len(hooks.at("/hang")) >= 2, "the timed-out POST was retried"


async def test_webhook_posts_carry_the_configured_headers_and_client_errors_are_not_retried(
    hooks: WebhookServer,
) -> None:
    from fabric.alerts import AlertPublisher
    from fabric.protocol.messages import AlertSeverity

    hooks.fail_first("/gone", 100, status=404)
    hooks.fail_first("/busy?team=ops", 1, status=429)
    settings = AlertSettings(
        webhooks=[hooks.url("/gone"), hooks.url("/busy?team=ops")],  # type: ignore[list-item]
        webhook_headers={"Authorization": "Bearer s3cret"},  # type: ignore[dict-item]
        webhook_backoff_s=0.05,
    )
    async with AlertPublisher(settings, "ns", None) as alerts:
        alerts.fire("k", kind="test.kind", severity=AlertSeverity.INFO, summary="hello")
        await alerts.flush(10)
    assert len(hooks.at("/gone")) == 1, "a 404 is not retried"
    busy = hooks.at("/busy?team=ops")
    assert len(busy) == 2, "a 429 is"
    assert busy[1].headers["authorization"] == "Bearer s3cret"
    assert busy[1].body["summary"] == "hello"
    assert alerts.stats == {**alerts.stats, "delivered": 1, "failed": 1}


async def test_resume_and_abort_over_http(
    client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    import httpx

    extra_caps.extend(["t.review", "t.after"])
    await start_worker(review_agent(Counter()))
    for workflow_id in ("esc-http-1", "esc-http-2"):
        await client.submit({"workflow_id": workflow_id, **DIAMOND})
    for workflow_id in ("esc-http-1", "esc-http-2"):
        await escalated(client, workflow_id, "review")
    base = f"http://127.0.0.1:{router.http_port}/api/v1/workflows"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        detail = (await http.get("/esc-http-1")).json()
        assert detail["tasks"]["review"]["status"] == "escalated"
        assert detail["tasks"]["review"]["escalation"]["reason"] == "requested"
        waiting = await http.post("/esc-http-1/tasks/after/resume", json={})
        assert waiting.status_code == 409
        assert "not escalated" in waiting.json()["detail"]
        assert (await http.post("/esc-http-1/tasks/nope/abort")).status_code == 404
        assert (await http.post("/nope/tasks/review/resume")).status_code == 404
        resumed = await http.post("/esc-http-1/tasks/review/resume", json={"input": {"approved": True}})
        assert resumed.status_code == 200, resumed.text
        assert resumed.json() == {
            "workflow_id": "esc-http-1",
            "task_id": "review",
            "status": "queued",
            "new_input": True,
        }
        aborted = await http.post("/esc-http-2/tasks/review/abort", json={"reason": "no"})
        assert aborted.status_code == 200, aborted.text
        assert aborted.json()["upstream_failed"] == ["after"]
        assert aborted.json()["workflow_status"] == "failed"
    assert (await client.wait("esc-http-1", timeout_s=60)).status == "succeeded"
    assert (await client.wait("esc-http-2", timeout_s=60)).status == "failed"


async def test_malformed_operator_requests_are_refused_by_name_and_change_nothing(
    settings: FabricSettings, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    import httpx

    small = settings.model_copy(
        update={"router": settings.router.model_copy(update={"max_body_bytes": 2048})}
    )
    extra_caps.extend(["t.review", "t.after"])
    await start_worker(review_agent(Counter()))
    async with Router(small) as router, FabricClient(small) as client:
        await client.submit({"workflow_id": "esc-5", **DIAMOND})
        await escalated(client, "esc-5", "review")
        with pytest.raises(RequestRefused, match="reason must be a string, not int"):
            await client.query("abort", "esc-5", task_id="review", reason=5)
        with pytest.raises(RequestRefused, match="larger than FABRIC_ROUTER__MAX_BODY_BYTES"):
            await client.resume("esc-5", "review", input="x" * 5000)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}", timeout=30) as http:
            big = await http.post("/api/v1/workflows/esc-5/tasks/review/resume", json={"input": "x" * 2100})
            assert big.status_code == 413, big.text
            assert big.json()["error"] == "too_large"
        # Still escalated, and the router still answers: a good resume completes the workflow.
        assert (await client.status("esc-5"))["tasks"]["review"]["status"] == "escalated"
        await client.resume("esc-5", "review", input={"approved": True})
        assert (await client.wait("esc-5", timeout_s=60)).status == "succeeded"
