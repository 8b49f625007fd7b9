"""What needs an operator, over the REST API on the real broker: a queue nobody serves is in
``/api/v1/stats`` (also after a router restart), firing alerts in ``/api/v1/alerts``, escalated tasks in
``/api/v1/escalated``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fabric.router.service import Router
from fabric.settings import AlertRuleSettings, AlertSettings, FabricSettings
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq

QUIET = {"error_rate": None, "queue_depth": None, "queue_age_s": None}


@pytest.fixture
def fast(settings: FabricSettings) -> FabricSettings:
    """Rules checked every 0.2 s; a queue without an agent alerts after 0.5 s."""
    return settings.model_copy(
        update={
            "router": settings.router.model_copy(update={"metrics_interval_s": 0.2}),
            "alerts": AlertSettings(rules=AlertRuleSettings(**QUIET, no_agent_after_s=0.5)),
        }
    )


@pytest.fixture
async def router(fast: FabricSettings) -> AsyncIterator[Router]:
    async with Router(fast) as r:
        yield r


def api(router: Router) -> httpx.AsyncClient:
    assert router.http_port
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}/api/v1", timeout=30)


async def submit(router: Router, body: dict[str, Any]) -> None:
    async with api(router) as http:
        response = await http.post(
            "/workflows", content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert response.status_code == 202, response.text


async def get(router: Router, path: str) -> Any:
    async with api(router) as http:
        response = await http.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_queue_no_agent_serves_is_in_stats_also_after_a_restart(
    fast: FabricSettings, router: Router, extra_caps: list[str]
) -> None:
    extra_caps.append("t.unserved")
    await submit(
        router,
        {"workflow_id": "stranded", "tasks": [{"id": f"t{i}", "capability": "t.unserved"} for i in range(2)]},
    )

    async def unserved(r: Router) -> dict[str, Any] | None:
        queue: dict[str, Any] | None = (await get(r, "/stats"))["queues"].get("t.unserved")
        return queue if queue and queue["messages"] == 2 else None

    queue = await eventually(lambda: unserved(router), what="t.unserved in /stats")
    assert (queue["consumers"], queue["agents"]) == (0, 0)

    # A new router has published nothing: it knows the capability from the running workflow it stores.
    await router.__aexit__(None, None, None)
    async with Router(fast) as again:
        queue = await eventually(lambda: unserved(again), what="t.unserved in /stats after a restart")
        assert (queue["consumers"], queue["agents"]) == (0, 0)

        # ... and its no_agent alert fires again, though this router has published nothing to it.
        async def alert() -> list[Any] | None:
            found = [
                a
                for a in (await get(again, "/alerts"))["items"]
                if a["key"] == "capability.no_agent:t.unserved"
            ]
            return found or None

        await eventually(alert, what="capability.no_agent:t.unserved after a restart")


async def test_served_queues_count_their_agents(router: Router, start_worker: StartWorker) -> None:
    await start_worker(demo)

    async def echo() -> dict[str, Any] | None:
        queue: dict[str, Any] | None = (await get(router, "/stats"))["queues"].get("demo.echo")
        return queue if queue and queue["agents"] == 1 else None

    queue = await eventually(echo, what="demo.echo served by one agent in /stats")
    assert queue["consumers"] >= 1


async def test_alerts_lists_the_firing_conditions(router: Router, extra_caps: list[str]) -> None:
    extra_caps.append("t.orphan")
    await submit(router, {"tasks": [{"id": "only", "capability": "t.orphan"}]})

    async def no_agent() -> dict[str, Any] | None:
        body = await get(router, "/alerts")
        found = [a for a in body["items"] if a["key"] == "capability.no_agent:t.orphan"]
        return found[0] if found else None

    alert = await eventually(no_agent, what="capability.no_agent in /alerts")
    assert alert["status"] == "firing"
    assert alert["severity"] == "critical"
    assert alert["summary"] == "1 task of t.orphan waits and no live agent serves it"
    assert (await get(router, "/alerts"))["active"] is True


async def test_escalated_lists_tasks_until_an_operator_acts(
    router: Router, start_worker: StartWorker
) -> None:
    await start_worker(demo)
    await submit(
        router,
        {
            "workflow_id": "needs-review",
            "tasks": [{"id": "review", "capability": "demo.review", "input": {"note": "check the totals"}}],
        },
    )

    async def listed() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = (await get(router, "/escalated"))["items"]
        return items or None

    (task,) = await eventually(listed, what="the escalated task in /escalated")
    assert (task["workflow_id"], task["task_id"], task["capability"]) == (
        "needs-review",
        "review",
        "demo.review",
    )
    assert task["escalation"]["reason"] == "requested"
    assert "check the totals" in task["error"]["message"]
    alerts = (await get(router, "/alerts"))["items"]
    assert "task.escalated:needs-review/review" in [a["key"] for a in alerts]

    async with api(router) as http:
        aborted = await http.post("/workflows/needs-review/tasks/review/abort", json={"reason": "wrong"})
    assert aborted.status_code == 200, aborted.text
    assert (await get(router, "/escalated"))["items"] == []
    async with api(router) as http:
        bad = await http.get("/escalated", params={"limit": 0})
    assert bad.status_code == 400
