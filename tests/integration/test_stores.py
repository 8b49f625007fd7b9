"""The router runs the same workflows on every state store backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from fabric import FabricClient
from fabric.router.service import Router
from fabric.settings import FabricSettings
from fabric.store.redis import RedisStore
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq

DIAMOND = {
    "tasks": [
        {"id": "a", "capability": "demo.sum", "input": 1},
        {"id": "b", "capability": "demo.sum", "input": 10, "depends_on": ["a"]},
        {"id": "c", "capability": "demo.fail", "input": "nope", "depends_on": ["a"], "max_attempts": 1},
        {"id": "d", "capability": "demo.sum", "input": 0, "depends_on": ["b", "c"]},
    ]
}


@pytest.fixture(params=["memory", "redis"])
async def store_settings(
    request: pytest.FixtureRequest, settings: FabricSettings, redis_url: str
) -> AsyncIterator[FabricSettings]:
    if request.param == "memory":
        yield settings.model_copy(update={"store": settings.store.model_copy(update={"url": "memory://"})})
        return
    request.applymarker(pytest.mark.redis)
    # A unique namespace already isolates keys; purge them afterwards.
    yield settings.model_copy(update={"store": settings.store.model_copy(update={"url": redis_url})})
    async with RedisStore(redis_url, prefix=f"{settings.namespace}:") as store:
        await store.purge()


async def test_workflow_on_each_store(store_settings: FabricSettings, start_worker: StartWorker) -> None:
    async with Router(store_settings) as router, FabricClient(store_settings) as client:
        await start_worker(demo)
        done = await client.run({"workflow_id": f"wf-{uuid.uuid4().hex[:6]}", **DIAMOND}, timeout_s=60)
        assert done.status == "failed"
        assert done.tasks["b"].result == 11
        assert done.tasks["c"].status == "dead"  # out of attempts: parked
        assert done.tasks["d"].status == "upstream_failed"
        stored = await router.store.get_workflow(done.workflow_id)
        assert stored is not None
        assert stored.status == "failed"
        assert stored.notified
        assert stored.remaining == 0
        agents = await client.query("agents")
        assert agents is not None
