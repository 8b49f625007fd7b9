"""``fabric router`` and ``fabric worker``: the two long-running processes, and the loader that finds an
agent by its name (``package.module:attribute``), which ``fabric demo`` uses too."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fabric.cli import format as cliformat
from fabric.cli.app import app, die, get_settings, run, setup_logging, until_signalled
from fabric.errors import TransportError

if TYPE_CHECKING:
    from fabric.worker.agent import Agent


@app.command()
def router() -> None:
    """Run the router: admit workflows, release ready tasks, record state, answer queries.

    Several routers may run against one broker; one is active, the others wait as standbys.
    Stops cleanly on SIGTERM or Ctrl-C.
    """
    from fabric.router.service import Router

    settings = get_settings()
    setup_logging(settings)

    async def main() -> None:
        stop = asyncio.Event()
        async with Router(settings):
            await until_signalled(stop)

    run(main())


def load_agent(target: str) -> Agent:
    """The Agent ``target`` (``package.module:attribute``) names, imported with the current directory
    on the path; exits 2 with one line saying what is wrong when there is none."""
    from fabric.worker.agent import Agent

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        die(f"{target!r} is not of the form package.module:agent (for example workers.demo:agent)", 2)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        die(f"cannot import module {module_name!r}: {exc}", 2)
    except Exception as exc:  # the module's own error: one line naming file:line, not a traceback
        die(cliformat.import_failure(module_name, exc), 2)
    agent = getattr(module, attr, cliformat.MISSING)
    if not isinstance(agent, Agent):
        agents = [name for name, value in vars(module).items() if isinstance(value, Agent)]
        die(cliformat.missing_agent(target, agents, agent), 2)
    return agent


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="The agent to run, as package.module:attribute.")],
    concurrency: Annotated[
        int | None, typer.Option(help="Tasks run at once (default FABRIC_WORKER__CONCURRENCY).", min=1)
    ] = None,
) -> None:
    """Run a worker for an agent: consume its capability queues and run its handlers.

    On SIGTERM or Ctrl-C the worker stops taking tasks and lets running ones finish
    (up to FABRIC_WORKER__DRAIN_TIMEOUT_S) before it exits.
    """
    from fabric.worker.runtime import Worker

    settings = get_settings()
    setup_logging(settings)
    agent = load_agent(target)

    async def main() -> None:
        stop = asyncio.Event()
        async with Worker(agent, settings, concurrency=concurrency) as running:
            waiter = asyncio.create_task(until_signalled(stop))
            stopped = asyncio.create_task(running.wait_stopped())
            await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if running.failed_fatally:
            raise TransportError("the worker could not consume its queues any more; see the log")

    run(main())
