"""The dashboard in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright for
Python; the browser is never downloaded), against an in-process router and worker on the real broker.

Without ``/usr/bin/chromium`` (or ``FABRIC_TEST_CHROMIUM``) the tests skip locally and fail on CI.
Screenshots are saved under ``FABRIC_TEST_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from playwright.async_api import Browser, Page, async_playwright, expect

from fabric.policy import RetryPolicy
from fabric.router.http.dashboard import Rates
from fabric.router.service import Router
from fabric.settings import AlertRuleSettings, AlertSettings, FabricSettings
from fabric.telemetry import Telemetry
from fabric.worker.runtime import Worker
from tests.conftest import eventually
from tests.otlp import OtlpReceiver
from workers.demo import agent as demo

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser]

CHROMIUM = os.environ.get("FABRIC_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FABRIC_TEST_ARTIFACTS", "test-artifacts"))
JAEGER = "http://jaeger.example:16686"
#: Playwright's expect() polls until this deadline (milliseconds).
DEADLINE_MS = 30_000


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the browser tests must run on CI)")
        pytest.skip(reason)


def artifact(name: str) -> str:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return str(ARTIFACTS / f"{name}.png")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as playwright:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox cannot start.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def dashboard_settings(settings: FabricSettings) -> FabricSettings:
    return settings.model_copy(
        update={
            "http": settings.http.model_copy(update={"jaeger_url": JAEGER, "stream_interval_s": 0.2}),
            "router": settings.router.model_copy(update={"sample_interval_s": 1.0}),
        }
    )


def traced(name: str, receiver: OtlpReceiver) -> Telemetry:
    return Telemetry(name, enabled=True, exporter=OTLPSpanExporter(endpoint=receiver.endpoint, timeout=5))


def traced_router(settings: FabricSettings, receiver: OtlpReceiver) -> Router:
    return Router(settings, telemetry=traced("fabric-router", receiver))


def five_tasks(workflow_id: str) -> dict[str, Any]:
    """a -> (b flaky, retried once; c sleeps) -> d -> e."""
    return {
        "workflow_id": workflow_id,
        "tasks": [
            {"id": "a", "capability": "demo.echo", "input": 1},
            {
                "id": "b",
                "capability": "demo.flaky",
                "input": {"fail_times": 1, "result": 2},
                "depends_on": ["a"],
            },
            {"id": "c", "capability": "demo.sleep", "input": 1.5, "depends_on": ["a"]},
            {"id": "d", "capability": "demo.sum", "input": 0, "depends_on": ["b", "c"]},
            {"id": "e", "capability": "demo.echo", "input": "done", "depends_on": ["d"]},
        ],
    }


async def submit(port: int, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        response = await http.post(
            "/api/v1/workflows", content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert response.status_code == 202, response.text


async def screenshot(page: Page, name: str) -> None:
    await page.screenshot(path=artifact(name), full_page=True)


async def test_live_view_workflow_dag_and_history_across_a_restart(
    dashboard_settings: FabricSettings, browser: Browser
) -> None:
    settings = dashboard_settings
    async with (
        OtlpReceiver() as receiver,
        Worker(demo, settings, concurrency=4, telemetry=traced("fabric-worker", receiver)),
    ):
        router = await traced_router(settings, receiver).__aenter__()
        try:
            port = router.http_port
            assert port
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/")
            await expect(page.locator("#connection")).to_have_text("live", timeout=DEADLINE_MS)
            await expect(page.locator("#agents tbody tr[data-agent]")).to_have_count(1, timeout=DEADLINE_MS)
            await expect(page.locator("#completed")).to_have_text("0")
            await expect(page.locator("#throughput")).to_have_text("0.0")
            # A marker that a reload would wipe: every later change must arrive without one.
            await page.evaluate("window.notReloaded = true")

            await submit(port, five_tasks("wf-dash"))
            running = page.locator('#running tr[data-workflow="wf-dash"]')
            await expect(running).to_be_visible(timeout=DEADLINE_MS)
            await screenshot(page, "dashboard-running")
            await expect(page.locator('#recent tr[data-workflow="wf-dash"]')).to_have_attribute(
                "data-status", "succeeded", timeout=DEADLINE_MS
            )
            await expect(running).to_have_count(0, timeout=DEADLINE_MS)
            await expect(page.locator("#completed")).to_have_text("1", timeout=DEADLINE_MS)
            await expect(page.locator("#throughput")).not_to_have_text("0.0", timeout=DEADLINE_MS)
            # One retried attempt out of six: the error rate moved.
            await expect(page.locator("#error-rate")).not_to_have_text("0.0 %", timeout=DEADLINE_MS)
            for capability in ("demo.echo", "demo.flaky", "demo.sleep", "demo.sum"):
                await expect(page.locator(f'#queues tr[data-capability="{capability}"]')).to_be_visible()
            assert await page.evaluate("window.notReloaded === true")
            await screenshot(page, "dashboard-live")

            # The workflow's page: its DAG, each task's state and attempts, the link to its trace.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                detail = (await http.get("/api/v1/workflows/wf-dash")).json()
            trace_id = detail["trace_id"]
            assert re.fullmatch("[0-9a-f]{32}", trace_id)
            await eventually(
                lambda: any(s.attributes.get("fabric.workflow.id") == "wf-dash" for s in receiver.spans),
                what="the workflow's spans at the OTLP receiver",
            )
            traces = {
                s.trace_id for s in receiver.spans if s.attributes.get("fabric.workflow.id") == "wf-dash"
            }
            assert traces == {trace_id}
            await check_workflow_page(page, port, trace_id)

            async def two_samples() -> bool:
                return len(await router_samples(port)) >= 2

            await eventually(two_samples, what="two stored samples", interval=0.2)
        finally:
            await router.__aexit__(None, None, None)

        # A new router over the same store: the history is all there.
        router = await traced_router(settings, receiver).__aenter__()
        try:
            port = router.http_port
            assert port
            await check_workflow_page(page, port, trace_id)
            await page.goto(f"http://127.0.0.1:{port}/")
            await expect(page.locator('#recent tr[data-workflow="wf-dash"]')).to_have_attribute(
                "data-status", "succeeded", timeout=DEADLINE_MS
            )
            charts = page.locator(".chart svg")
            await expect(charts).to_have_count(5, timeout=DEADLINE_MS)
            points = await charts.first.get_attribute("data-points")
            assert points is not None
            assert int(points) >= 2, "the samples stored before the restart are drawn"
            await screenshot(page, "dashboard-after-restart")
        finally:
            await router.__aexit__(None, None, None)


async def router_samples(port: int) -> list[Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{port}/api/v1/history")
    assert response.status_code == 200
    items: list[Any] = response.json()["items"]
    return items


async def check_workflow_page(page: Page, port: int, trace_id: str) -> None:
    await page.goto(f"http://127.0.0.1:{port}/workflows/wf-dash")
    nodes = page.locator("#dag g.node")
    await expect(nodes).to_have_count(5, timeout=DEADLINE_MS)
    for task_id in "abcde":
        node = page.locator(f'#dag g.node[data-task="{task_id}"]')
        await expect(node).to_have_attribute("data-status", "succeeded")
        await expect(node).to_have_attribute("data-attempts", "2" if task_id == "b" else "1")
    await expect(page.locator("#dag path.edge")).to_have_count(5)
    await expect(page.locator("#wf-status")).to_have_text("succeeded")
    await expect(page.locator("#trace-link")).to_have_attribute("href", f"{JAEGER}/trace/{trace_id}")
    await expect(page.locator('#tasks tr[data-task="b"]')).to_contain_text("flaky failure on attempt 1")
    await screenshot(page, "dashboard-workflow")


def test_rates_are_over_the_last_window() -> None:
    rates = Rates()
    assert rates.update(100.0, {"tasks_succeeded": 0}) == {
        "window_s": 0.0,
        "tasks_per_s": 0.0,
        "error_rate": 0.0,
    }
    moved = rates.update(102.0, {"tasks_succeeded": 8, "tasks_retried": 2})
    assert moved == {"window_s": 2.0, "tasks_per_s": 4.0, "error_rate": 0.2}
    # Old points leave the window: the rate is what moved in about the last ten seconds.
    rates.update(111.0, {"tasks_succeeded": 8, "tasks_retried": 2})
    assert rates.update(130.0, {"tasks_succeeded": 8, "tasks_retried": 2})["tasks_per_s"] == 0.0


# -- what needs attention, and the workflow page -------------------------------------------------------


@pytest.fixture
def attention_settings(dashboard_settings: FabricSettings) -> FabricSettings:
    """Rules checked every 0.2 s: a queue without an agent alerts after 0.5 s; no other rule."""
    settings = dashboard_settings
    rules = AlertRuleSettings(error_rate=None, queue_depth=None, queue_age_s=None, no_agent_after_s=0.5)
    return settings.model_copy(
        update={
            "router": settings.router.model_copy(update={"metrics_interval_s": 0.2}),
            "alerts": AlertSettings(rules=rules),
        }
    )


async def test_needs_attention_box_shows_an_alert_and_an_escalated_task(
    attention_settings: FabricSettings, browser: Browser, extra_caps: list[str]
) -> None:
    settings = attention_settings
    extra_caps.append("t.stranded")
    async with Worker(demo, settings, concurrency=2), Router(settings) as router:
        port = router.http_port
        assert port
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")
        await expect(page.locator("#connection")).to_have_text("live", timeout=DEADLINE_MS)
        await expect(page.locator("#attention")).to_have_class(re.compile(r"\bcalm\b"), timeout=DEADLINE_MS)

        # Work no agent serves, and a task that waits for an operator.
        await submit(port, {"tasks": [{"id": f"s{i}", "capability": "t.stranded"} for i in range(3)]})
        await submit(
            port,
            {
                "workflow_id": "wf-review",
                "metadata": {"name": "quarterly review"},
                "tasks": [{"id": "review", "capability": "demo.review", "input": {"note": "check totals"}}],
            },
        )
        box = page.locator("#attention")
        alert = box.locator('li[data-key="capability.no_agent:t.stranded"]')
        await expect(alert).to_contain_text(
            "3 tasks of t.stranded wait and no live agent serves it", timeout=DEADLINE_MS
        )
        escalated = box.locator('li[data-kind="escalated"][data-workflow="wf-review"][data-task="review"]')
        await expect(escalated).to_contain_text("waits for an operator", timeout=DEADLINE_MS)
        await expect(escalated.locator('a[href="/workflows/wf-review"]')).to_be_visible()
        await expect(box).not_to_have_class(re.compile(r"\bcalm\b"))
        # The escalated task's own alert is not listed a second time.
        await expect(box.locator('li[data-key="task.escalated:wf-review/review"]')).to_have_count(0)

        # The stranded queue: counted, red and first, with no consumer and no agent.
        first = page.locator("#queues tbody tr").first
        await expect(first).to_have_attribute("data-capability", "t.stranded", timeout=DEADLINE_MS)
        await expect(first).to_have_class("stuck")
        await expect(first.locator("td").nth(1)).to_have_text("3")
        await expect(first.locator("td").nth(3)).to_have_text("0")
        await expect(page.locator("#queued-tile")).to_have_class(re.compile(r"\bbad\b"))
        assert int(await page.locator("#queued").inner_text()) >= 3

        # Workflows are listed by the name their submitter set, on one line.
        link = page.locator('#running tr[data-workflow="wf-review"] a.wf')
        await expect(link).to_have_text("quarterly review", timeout=DEADLINE_MS)
        box_height = (await link.bounding_box() or {}).get("height", 0)
        assert 0 < box_height < 24, f"one line, not wrapped ({box_height}px)"
        await screenshot(page, "dashboard-needs-attention")


def fails(task_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "capability": "demo.fail", "input": "boom", "max_attempts": 3, **fields}


async def test_workflow_page_names_lays_out_and_explains_its_tasks(
    dashboard_settings: FabricSettings, browser: Browser
) -> None:
    settings = dashboard_settings
    # One short delay tier: three attempts within seconds.
    policy = RetryPolicy({"1s": 1_000}, jitter=0.0)
    body = {
        "workflow_id": "wf-page",
        "metadata": {"name": "nightly report", "team": "finance"},
        "tasks": [
            {"id": "a", "capability": "demo.echo", "input": "hello"},
            {"id": "b", "capability": "demo.echo", "input": {"n": 2}},
            # Sorted by id, column 2 would be [y, z] and the edges a->z, b->y would cross.
            {"id": "y", "capability": "demo.echo", "depends_on": ["b"]},
            {"id": "z", "capability": "demo.echo", "depends_on": ["a"]},
            fails("fail", on_exhausted="park"),
            {"id": "publish-summary", "capability": "demo.echo", "depends_on": ["fail"]},
            {"id": "review", "capability": "demo.review", "input": {"note": "sign off"}},
        ],
    }
    async with Worker(demo, settings, concurrency=4, policy=policy), Router(settings) as router:
        port = router.http_port
        assert port
        await submit(port, body)
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/workflows/wf-page")
        await expect(page.locator('#tasks tr[data-task="publish-summary"]')).to_have_attribute(
            "data-status", "upstream_failed", timeout=DEADLINE_MS
        )
        await expect(page.locator('#tasks tr[data-task="review"]')).to_have_attribute(
            "data-status", "escalated", timeout=DEADLINE_MS
        )
        await expect(page.locator('#tasks tr[data-task="z"]')).to_have_attribute(
            "data-status", "succeeded", timeout=DEADLINE_MS
        )
        await expect(page.locator('#tasks tr[data-task="y"]')).to_have_attribute(
            "data-status", "succeeded", timeout=DEADLINE_MS
        )
        await expect(page.locator("#wf-name")).to_have_text("nightly report")
        await expect(page.locator("#wf-id")).to_have_text("wf-page")
        await expect(page.locator("#wf-meta")).to_contain_text("team: finance")

        # Every node's text fits in its box.
        clipped = await page.evaluate(
            """() => [...document.querySelectorAll('#dag g.node')].flatMap((node) => {
                const width = Number(node.querySelector('rect').getAttribute('width'));
                return [...node.querySelectorAll('text')]
                  .filter((t) => Number(t.getAttribute('x')) + t.getComputedTextLength() > width - 4)
                  .map((t) => t.textContent);
            })"""
        )
        assert clipped == [], f"clipped node text: {clipped}"
        await expect(page.locator('#dag g.node[data-task="publish-summary"] text.sub')).to_have_text(
            "upstream_failed · not started"
        )
        assert await edge_crossings(page) == 0

        # One line per distinct error, with its attempts; the results; how to resume or abort.
        errors = page.locator('#tasks tr[data-task="fail"] td.errors .err')
        await expect(errors).to_have_text(["attempts 1\u20133: ValueError: boom"])
        await expect(page.locator('#tasks tr[data-task="publish-summary"] td.errors .err')).to_have_text(
            ["UpstreamFailed: dependency 'fail' ended dead"]
        )
        await expect(page.locator('#tasks tr[data-task="a"] td.result')).to_have_text('"hello"')
        await expect(page.locator('#tasks tr[data-task="b"] td.result')).to_have_text('{"n":2}')
        actions = page.locator('#wf-actions li[data-task="review"]')
        await expect(actions).to_contain_text("fabric resume wf-page --task review")
        await expect(actions).to_contain_text("fabric abort wf-page --task review")
        await expect(actions).to_contain_text("POST /api/v1/workflows/wf-page/tasks/review/resume")
        await expect(actions).to_contain_text("POST /api/v1/workflows/wf-page/tasks/review/abort")
        await screenshot(page, "dashboard-workflow-escalated")


async def edge_crossings(page: Page) -> int:
    """Pairs of edges between the same two columns whose ends are in opposite vertical orders."""
    crossings: int = await page.evaluate(
        """() => {
            const y = {}, column = {};
            for (const node of document.querySelectorAll('#dag g.node')) {
              y[node.dataset.task] = Number(node.getAttribute('transform').match(/,([-\\d.]+)\\)/)[1]);
              column[node.dataset.task] = node.dataset.column;
            }
            const edges = [...document.querySelectorAll('#dag path.edge')]
              .map((e) => [e.dataset.from, e.dataset.to]);
            let count = 0;
            for (let i = 0; i < edges.length; i++) for (let j = i + 1; j < edges.length; j++) {
              const [a, b] = edges[i], [c, d] = edges[j];
              if (column[a] !== column[c] || column[b] !== column[d]) continue;
              if ((y[a] - y[c]) * (y[b] - y[d]) < 0) count++;
            }
            return count;
        }"""
    )
    return crossings


async def test_workflow_page_of_an_unknown_workflow_says_not_found(
    dashboard_settings: FabricSettings, browser: Browser
) -> None:
    async with Router(dashboard_settings) as router:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{router.http_port}/workflows/no-such-workflow")
        await expect(page.locator("#wf-missing")).to_be_visible(timeout=DEADLINE_MS)
        await expect(page.locator("#wf-missing")).to_contain_text("Workflow not found")
        await expect(page.locator("#wf-error")).to_contain_text("no workflow no-such-workflow")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "missing")
        await expect(page.locator("#connection")).to_have_text("not found")
        await expect(page.locator("#dag-box")).to_be_hidden()
        await expect(page.locator("#tasks")).to_be_hidden()
        await screenshot(page, "dashboard-workflow-not-found")
