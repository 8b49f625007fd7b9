"""The HTTP layer runs on the router's parts alone (fabric.router.http.ports), here fakes: no Router, no
broker. What a route does with a part is what the router does with it (the integration tests run the
same routes on a real router)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fabric.protocol.messages import Accepted, Alert, AlertSeverity, Rejected
from fabric.router.admission import Refusal
from fabric.router.http import Parts, build_app
from fabric.router.http.server import serves_dashboard
from fabric.router.http.views import build_stats
from fabric.settings import FabricSettings
from fabric.store.memory import MemoryStore
from tests.golden.wire import check


@dataclass(frozen=True)
class Decided:
    reply: Accepted | Rejected
    resent: bool = False


class FakeIntake:
    def __init__(self) -> None:
        self.counted = 0
        self.calls: list[tuple[str, Any]] = []

    def count_submission(self) -> None:
        self.counted += 1

    @contextlib.contextmanager
    def http_span(self, method: str, route: str, request_headers: Mapping[str, str]) -> Iterator[None]:
        self.calls.append(("span", f"{method} {route}"))
        yield

    async def submit(
        self, body: bytes, content_type: str | None, *, message_id: str | None, notify_tasks: bool = False
    ) -> Decided:
        self.calls.append(("submit", (body, content_type, message_id, notify_tasks)))
        return Decided(Accepted(workflow_id="wf-1", tasks=1), resent=message_id == "again")

    async def refuse(self, message_id: str | None, refusal: Refusal, content_type: str | None) -> Decided:
        self.calls.append(("refuse", refusal.reason))
        return Decided(Rejected(workflow_id=None, reason=refusal.reason, detail=refusal.detail))


class FakeOperator:
    async def why(self, workflow_id: str, task_id: str | None = None) -> list[dict[str, Any]]:
        raise KeyError(f"no workflow {workflow_id!r}")

    async def cancel(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        return {"workflow_id": workflow_id, "cancelled": ["a"], "status": "cancelled"}

    async def resume(self, workflow_id: str, task_id: str, **new: Any) -> dict[str, Any]:
        raise ValueError(f"task {task_id!r} is succeeded, not escalated")

    async def abort(self, workflow_id: str, task_id: str, reason: str | None = None) -> dict[str, Any]:
        raise KeyError(f"no task {task_id!r}")


class FakeMonitoring:
    ns = "unit"
    active = True

    def __init__(self) -> None:
        # Started 5 s before this fake is made (a class attribute would date from collection).
        self.started_at = time.time() - 5
        self.stopping = asyncio.Event()
        self.published_capabilities = frozenset({"echo"})

    def counters(self) -> dict[str, int]:
        return {"submissions": 3, "accepted": 2}

    def totals(self) -> dict[str, int]:
        return {"tasks_succeeded": 1}

    def firing_alerts(self) -> list[Alert]:
        return [
            Alert(
                alert_id="1",
                key="agent.lost:a",
                kind="agent.lost",
                severity=AlertSeverity.WARNING,
                namespace="unit",
                summary="lost",
                at=1.0,
            )
        ]

    async def agents(self) -> list[dict[str, Any]]:
        return []

    async def queue_depths(self, capabilities: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {c: {"queue": f"unit.task.{c}", "messages": 4, "consumers": 0} for c in sorted(capabilities)}

    async def dead_queue_depth(self) -> dict[str, Any] | None:
        return None


@dataclass
class Served:
    http: httpx.AsyncClient
    intake: FakeIntake
    parts: Parts


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    settings = FabricSettings(namespace="unit")
    intake = FakeIntake()
    async with MemoryStore() as store:
        parts = Parts(
            settings, intake=intake, operator=FakeOperator(), monitoring=FakeMonitoring(), store=store
        )
        app = build_app(parts, checks={}, metrics=lambda: "fabric_up 1\n")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            yield Served(http, intake, parts)


async def test_a_submission_is_counted_through_the_intake_and_admitted_by_it(served: Served) -> None:
    response = await served.http.post(
        "/api/v1/workflows",
        content=b"{}",
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": "again",
            "Fabric-Notify-Tasks": "true",
        },
    )
    assert response.status_code == 202
    assert response.headers["Location"] == "/api/v1/workflows/wf-1"
    assert response.headers["Idempotent-Replayed"] == "true"
    assert served.intake.counted == 1
    assert served.intake.calls == [
        ("span", "POST /api/v1/workflows"),
        ("submit", (b"{}", "application/json", "again", True)),
    ]


async def test_a_body_over_the_limit_is_counted_and_refused_through_the_intake(served: Served) -> None:
    limit = served.parts.settings.router.max_body_bytes
    response = await served.http.post(
        "/api/v1/workflows", content=b"x" * (limit + 1), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["reason"] == "too_large"
    assert served.intake.counted == 1
    assert [call[0] for call in served.intake.calls] == ["span", "refuse"]


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/api/v1/workflows/wf-1/why", 404, "not_found"),
        ("POST", "/api/v1/workflows/wf-1/tasks/t/resume", 409, "not_escalated"),
        ("POST", "/api/v1/workflows/wf-1/tasks/t/abort", 404, "not_found"),
        ("GET", "/api/v1/workflows/wf-1", 404, "not_found"),
    ],
)
async def test_what_the_operator_or_the_store_refuses_is_a_problem(
    served: Served, method: str, path: str, status: int, error: str
) -> None:
    response = await served.http.request(method, path)
    assert response.status_code == status
    assert response.json()["error"] == error


async def test_cancel_answers_what_the_operator_did(served: Served) -> None:
    response = await served.http.post("/api/v1/workflows/wf-1/cancel")
    assert response.status_code == 200
    assert response.json() == {"workflow_id": "wf-1", "cancelled": ["a"], "status": "cancelled"}


async def test_stats_and_alerts_come_from_monitoring(served: Served) -> None:
    stats = (await served.http.get("/api/v1/stats")).json()
    assert stats["namespace"] == "unit"
    assert stats["counters"] == {"submissions": 3, "accepted": 2}
    assert stats["queues"] == {
        "echo": {"queue": "unit.task.echo", "messages": 4, "consumers": 0, "agents": 0}
    }
    assert 5 <= stats["uptime_s"] < 60
    alerts = (await served.http.get("/api/v1/alerts")).json()
    assert alerts["active"] is True
    assert [a["key"] for a in alerts["items"]] == ["agent.lost:a"]


async def test_build_stats_does_not_share_the_counters_it_reads(served: Served) -> None:
    stats = await build_stats(served.parts.monitoring, served.parts.store)
    stats.counters["submissions"] += 100
    assert served.parts.monitoring.counters()["submissions"] == 3


async def test_the_dashboard_and_health_are_served_from_the_parts(served: Served) -> None:
    page = await served.http.get("/")
    assert page.status_code == 200
    assert "unit" in page.text
    assert (await served.http.get("/static/dashboard.js")).status_code == 200
    assert (await served.http.get("/healthz")).json() == {"status": "ok"}
    assert (await served.http.get("/metrics")).text == "fabric_up 1\n"
    history = (await served.http.get("/api/v1/history")).json()
    assert history["items"] == []


async def test_the_openapi_document_built_from_parts_is_the_golden_one(served: Served) -> None:
    response = await served.http.get("/api/v1/openapi.json")
    check("openapi.json", json.loads(response.content))


async def test_a_wrong_method_names_every_method_of_the_path(served: Served) -> None:
    response = await served.http.delete("/api/v1/workflows")
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}


def test_the_start_line_names_the_dashboard_only_when_it_is_served(served: Served) -> None:
    with_page = build_app(served.parts, checks={}, metrics=None)
    without = build_app(served.parts, checks={}, metrics=None, dashboard=False)
    assert (serves_dashboard(with_page), serves_dashboard(without)) == (True, False)
