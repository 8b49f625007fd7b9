"""``fabric demo``: start a router and demo workers on the local broker, run a small DAG, clean up.

The demo agent is loaded by its name (:data:`DEMO_AGENT`) through the loader ``fabric worker`` uses:
fabric itself never imports the example workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fabric.cli.app import app, err, get_settings, run
from fabric.cli.processes import load_agent
from fabric.cli.workflows import print_completed, submit_and_watch
from fabric.client.client import FabricClient
from fabric.errors import TransportError
from fabric.protocol.messages import Completed
from fabric.topology import names

#: The agent the demo workers run, as ``fabric worker`` takes it.
DEMO_AGENT = "workers.demo:agent"


def demo_workflow(width: int = 8) -> dict[str, Any]:
    """The demo DAG: a fan-out of summing and sleeping tasks joined at the end."""
    tasks: list[dict[str, Any]] = [{"id": "fetch", "capability": "demo.echo", "input": [1, 2, 3]}]
    for i in range(width):
        tasks.append(
            {"id": f"score-{i}", "capability": "demo.sum", "input": i, "depends_on": ["fetch"], "priority": 7}
        )
        tasks.append(
            {
                "id": f"think-{i}",
                "capability": "demo.sleep",
                "input": {"seconds": 0.2},
                "depends_on": ["fetch"],
            }
        )
    tasks.append(
        {
            "id": "report",
            "capability": "demo.sum",
            "input": 0,
            "depends_on": [f"score-{i}" for i in range(width)],
        }
    )
    return {"metadata": {"example": "fabric demo"}, "tasks": tasks}


@app.command()
def demo(
    workers: Annotated[int, typer.Option(help="How many demo workers to start.", min=1, max=8)] = 2,
) -> None:
    """Run the demo: start a router and demo workers on the local broker, submit a DAG, print its result.

    Everything it starts is stopped at the end, and its queues (namespace FABRIC_NAMESPACE, default
    'fabric-demo') are deleted.
    """
    from fabric.topology import spec
    from fabric.transport.amqp import AmqpConnection

    settings = get_settings(namespace=os.environ.get("FABRIC_NAMESPACE", "fabric-demo"))
    agent = load_agent(DEMO_AGENT)
    command = [sys.executable, "-m", "fabric.cli"]
    workdir = Path(tempfile.mkdtemp(prefix="fabric-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env.update(
        FABRIC_NAMESPACE=settings.namespace,
        FABRIC_AMQP_URL=settings.amqp_url.get_secret_value(),
        FABRIC_STORE__URL=f"sqlite:///{workdir / 'fabric.db'}",
        FABRIC_LOG_LEVEL="WARNING",
        FABRIC_HTTP__PORT="0",
    )
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> None:
        log = (workdir / f"{args[0]}-{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen([*command, *args], env=env, stdout=log, stderr=subprocess.STDOUT))

    async def ready(amqp: AmqpConnection, queue: str, consumers: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            info = await amqp.queue_info(queue)
            if info is not None and info.consumers >= consumers:
                return
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise TransportError(f"demo processes did not start; see the logs in {workdir}")
            await asyncio.sleep(0.1)

    async def main() -> Completed:
        async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-demo") as amqp:
            err.print(
                f"starting a router and {workers} demo workers "
                f"(namespace {settings.namespace!r}, logs in {workdir})"
            )
            spawn("router")
            await ready(amqp, names.submit_queue(settings.namespace), 1)
            for _ in range(workers):
                spawn("worker", DEMO_AGENT)
            await ready(amqp, names.capability_queue(settings.namespace, "demo.sum"), workers)
            try:
                async with FabricClient(settings) as client:
                    document = demo_workflow()
                    started = time.monotonic()
                    done = await submit_and_watch(client, document, len(document["tasks"]), 120, quiet=False)
                    elapsed = time.monotonic() - started
                    err.print(f"{len(done.tasks)} tasks in {elapsed:.2f}s")
                    return done
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                await amqp.delete(spec.build(settings.namespace, agent.capabilities))

    done = run(main())
    print_completed(done)
    raise typer.Exit(0 if done.status == "succeeded" else 1)
