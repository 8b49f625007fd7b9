"""A clean stop is not a crash: a worker process stopped with SIGTERM exits 0, logs that it drained and
stopped, and ``fabric agents`` shows it ``stopped``; no ``agent.lost`` alert, while a worker killed
beside it is ``lost`` and alerted."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from fabric.settings import FabricSettings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Delivery
from tests.conftest import eventually
from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def _agents(fleet: Fleet) -> dict[str, dict[str, Any]]:
    done = run_cli(fleet.env, "agents", "--json")
    assert done.returncode == 0, done.stderr
    return {a["agent_id"]: a for a in json.loads(done.stdout)}


async def test_sigterm_stops_cleanly_and_is_shown_stopped_not_lost(
    fleet: Fleet, settings: FabricSettings, broker: AmqpConnection
) -> None:
    alerts: list[dict[str, Any]] = []

    async def on_alert(delivery: Delivery) -> None:
        alerts.append(json.loads(delivery.body))

    fleet.env["FABRIC_ROUTER__METRICS_INTERVAL_S"] = "0.3"  # the alert rules run this often
    await fleet.router()
    listener = await broker.reply_queue(on_alert, prefetch=100)
    await listener.bind(names.alerts_exchange(settings.namespace), "alert.#")
    clean = await fleet.worker("clean")
    crashed = await fleet.worker("crashed")
    await eventually(
        lambda: {"clean", "crashed"} <= set(_agents(fleet)), timeout=30, what="both workers heartbeating"
    )

    clean.kill(signal.SIGTERM)
    assert clean.wait(30) == 0, clean.log()
    log = clean.log()
    assert "worker clean draining:" in log, log
    assert "worker clean stopped: drained 0 tasks" in log, log
    crashed.kill(signal.SIGKILL)
    crashed.wait(30)

    # The killed worker goes silent after the stopped one: once it is lost and alerted, the rules
    # have judged the stopped one past the same silence.
    def lost_alert() -> list[dict[str, Any]]:
        return [a for a in alerts if a["key"] == "agent.lost:crashed" and a["status"] == "firing"]

    await eventually(lost_alert, timeout=30, what="the killed worker alerted lost")
    agents = _agents(fleet)
    assert agents["clean"]["state"] == "stopped", agents["clean"]
    assert agents["clean"]["health"] == "stopped"
    assert agents["crashed"]["state"] == "lost"
    assert [a for a in alerts if a["key"] == "agent.lost:clean"] == []

    table = run_cli({**fleet.env, "COLUMNS": "200"}, "agents")
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if "clean" in line]
    assert "stopped" in row, table.stdout
    assert "lost" not in row, table.stdout
