"""`fabric demo`: a router and demo workers it starts itself run the demo DAG, and everything it
declared is gone afterwards. Its agent is loaded by name, as `fabric worker workers.demo:agent` does."""

from __future__ import annotations

import pytest

from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.conftest import subprocess_env
from tests.e2e.conftest import run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


async def test_demo_runs_the_dag_and_deletes_its_queues(
    settings: FabricSettings, broker: AmqpConnection
) -> None:
    done = run_cli(subprocess_env(settings), "demo", "--workers", "1", timeout=180)

    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    assert "18 tasks in" in done.stderr
    ns = settings.namespace
    queues = [names.submit_queue(ns), names.dead_queue(ns), names.capability_queue(ns, "demo.sum")]
    assert [await broker.queue_info(q) for q in queues] == [None, None, None]
