"""Health endpoints of the router and workers."""

from __future__ import annotations

import asyncio
import json

import pytest

from fabric import FabricClient
from fabric.router.service import Router
from tests.conftest import eventually
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> dict[str, float]:
    """Samples by name with their labels, e.g. ``fabric_workflows_completed_total{status="failed"}``."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


async def test_router_and_worker_health(
    router: Router, start_worker: StartWorker, client: FabricClient
) -> None:
    worker = await start_worker(demo)
    assert router.http_port
    assert worker.http_port
    status, body = await http_get(router.http_port, "/healthz")
    assert status == 200
    status, body = await http_get(router.http_port, "/readyz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {"broker": "ok", "consumers": "ok", "store": "ok"}
    status, body = await http_get(worker.http_port, "/readyz")
    assert status == 200, body

    before = samples((await http_get(router.http_port, "/metrics"))[1])
    await client.run(
        {
            "tasks": [
                {"id": "a", "capability": "demo.echo"},
                {"id": "b", "capability": "demo.fail", "max_attempts": 1},
            ]
        },
        timeout_s=60,
    )
    port = router.http_port

    async def completed_counted() -> dict[str, float] | None:
        after = samples((await http_get(port, "/metrics"))[1])
        done = 'fabric_workflows_completed_total{status="failed"}'
        return after if after.get(done, 0) > before.get(done, 0) else None

    # The counter moves just after the completed document is published, so wait for it.
    after = await eventually(completed_counted, what="completion counted")
    assert after["fabric_workflows_submitted_total"] - before["fabric_workflows_submitted_total"] == 1
    done = 'fabric_workflows_completed_total{status="failed"}'
    assert after[done] - before.get(done, 0) == 1
    worker_metrics = samples((await http_get(worker.http_port, "/metrics"))[1])
    assert worker_metrics['fabric_worker_tasks_succeeded_total{capability="demo.echo"}'] == 1
    assert worker_metrics['fabric_worker_tasks_failed_total{capability="demo.fail"}'] == 1

    assert (await http_get(router.http_port, "/nope"))[0] == 404
    await worker.drain(timeout_s=5)
