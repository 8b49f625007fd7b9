"""`fabric topology delete` deletes the capability queues too, refuses busy queues unless forced, and says
exactly what it deleted and what it left, against router and worker subprocesses on the real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection
from tests.conftest import DEMO_CAPABILITIES, eventually
from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]

#: A capability no store knows of: only `-c` finds its queue.
UNRECORDED = "other.thing"


async def existing(broker: AmqpConnection, topology: spec.Topology) -> tuple[list[str], list[str]]:
    """The queues and exchanges of ``topology`` that exist on the broker."""
    queues = await broker.queue_infos(q.name for q in topology.queues)
    exchanges = await broker.exchanges_exist(e.name for e in topology.exchanges)
    found = [q for q, info in queues.items() if info is not None]
    return found, [e for e, there in exchanges.items() if there]


async def test_delete_refuses_busy_queues_then_force_deletes_every_capability_queue(
    fleet: Fleet, broker: AmqpConnection, tmp_path: Path, extra_caps: list[str]
) -> None:
    extra_caps.append(UNRECORDED)
    ns = fleet.settings.namespace
    everything = spec.build(ns, [*DEMO_CAPABILITIES, UNRECORDED])
    router = await fleet.router()
    worker = await fleet.worker("w1")
    echo = tmp_path / "echo.json"
    echo.write_text(json.dumps({"tasks": [{"id": "a", "capability": "demo.echo", "input": "hi"}]}))
    assert run_cli(fleet.env, "submit", str(echo), "--wait").returncode == 0
    await broker.declare(spec.capability(ns, UNRECORDED))

    # While the router runs, its queues have consumers: refused, nothing deleted.
    busy = run_cli(fleet.env, "topology", "delete", "--yes")
    assert busy.returncode == 4, busy.stdout + busy.stderr
    assert f"queue {names.submit_queue(ns)}: has 1 consumer(s)" in busy.stdout
    assert "nothing of namespace" in busy.stdout

    # A task queued for a capability whose worker stopped: its queue holds a message.
    worker.stop()
    assert run_cli(fleet.env, "submit", str(echo)).returncode == 0
    echo_queue = names.capability_queue(ns, "demo.echo")

    async def one_waiting() -> bool:
        info = await broker.queue_info(echo_queue)
        return info is not None and info.messages == 1

    await eventually(one_waiting, timeout=30, what="the task to wait in its capability queue")
    router.stop()
    await eventually(
        lambda: _unconsumed(broker, names.submit_queue(ns)), timeout=30, what="the router's consumers to go"
    )

    refused = run_cli(fleet.env, "topology", "delete", "--yes")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"queue {echo_queue}: holds 1 message(s)" in refused.stdout
    queues, exchanges = await existing(broker, everything)
    assert len(queues) == len(everything.queues), "a refusal deletes nothing"
    assert len(exchanges) == len(everything.exchanges), "a refusal deletes nothing"

    forced = run_cli(fleet.env, "topology", "delete", "--yes", "--force", "-c", UNRECORDED)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert f"queue {echo_queue} (1 message(s) lost)" in forced.stdout
    for queue in (echo_queue, names.capability_queue(ns, "demo.sum"), names.capability_queue(ns, UNRECORDED)):
        assert f"  queue {queue}" in forced.stdout
    assert f"  exchange {names.tasks_exchange(ns)}" in forced.stdout
    assert await existing(broker, everything) == ([], []), "every queue and exchange is gone"

    again = run_cli(fleet.env, "topology", "delete", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"nothing of namespace {ns!r} to delete" in again.stdout


async def _unconsumed(broker: AmqpConnection, queue: str) -> bool:
    info = await broker.queue_info(queue)
    return info is not None and info.consumers == 0


async def test_delete_leaves_an_exchange_still_bound_to_a_queue_it_was_not_told_about(
    fleet: Fleet, broker: AmqpConnection, extra_caps: list[str]
) -> None:
    extra_caps.append(UNRECORDED)
    ns = fleet.settings.namespace
    await broker.declare(spec.build(ns, [UNRECORDED]))
    left = run_cli(fleet.env, "topology", "delete", "--yes")
    assert left.returncode == 4, left.stdout + left.stderr
    assert "left 1:" in left.stdout
    assert f"  exchange {names.tasks_exchange(ns)}: still bound to a queue" in left.stdout
    assert await broker.queue_info(names.capability_queue(ns, UNRECORDED)) is not None
    assert await broker.queue_info(names.dead_queue(ns)) is None, "the rest is deleted"
