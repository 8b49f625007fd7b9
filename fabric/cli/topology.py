"""``fabric topology``: check, declare or delete the namespace's exchanges and queues on the broker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fabric.cli.app import JsonOpt, app, console, die, get_settings, run
from fabric.cli.help import FabricTyper
from fabric.errors import ConfigError, FabricError
from fabric.settings import FabricSettings

topology_app = FabricTyper(
    help="Inspect or create the broker topology (exchanges and queues).", no_args_is_help=True
)
app.add_typer(topology_app, name="topology")


CapOpt = Annotated[
    list[str] | None, typer.Option("--capability", "-c", help="Also cover this capability's queue.")
]


@topology_app.command("check")
def topology_check(capability: CapOpt = None, json_out: JsonOpt = False) -> None:
    """Compare the broker with the expected topology without creating anything.

    Reports missing exchanges/queues and queues declared with other arguments (drift). Exits 1 on problems.
    """
    from fabric.topology import spec
    from fabric.transport.amqp import AmqpConnection

    settings = get_settings()

    async def main() -> list[str]:
        try:
            expected = spec.build(settings.namespace, capability or [])
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp:
            return await amqp.check(expected)

    problems = run(main())
    if json_out:
        console.print_json(data={"ok": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            console.print(f"[red]✗[/] {problem}", highlight=False)
    else:
        console.print(f"[green]✓[/] topology of namespace {settings.namespace!r} matches")
    raise typer.Exit(1 if problems else 0)


@topology_app.command("declare")
def topology_declare(capability: CapOpt = None) -> None:
    """Declare the topology (idempotent); fails with a clear message on drift."""
    from fabric.topology import spec
    from fabric.transport.amqp import AmqpConnection

    settings = get_settings()

    async def main() -> None:
        async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp:
            await amqp.declare(spec.build(settings.namespace, capability or []))

    run(main())
    console.print(f"declared topology of namespace {settings.namespace!r}")


@topology_app.command("delete")
def topology_delete(
    capability: CapOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really delete.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Delete queues that hold messages or have consumers too (messages are lost)."
        ),
    ] = False,
) -> None:
    """Delete the namespace's exchanges and queues: the core ones, and the queue of every capability the
    state store knows of (its workflows' and agents') or -c names. Needs --yes.

    Refuses, deleting nothing (exit 4), while any queue holds messages or has consumers, unless --force.
    Prints what was deleted, what was left and why.
    """
    if not yes:
        die("this deletes queues and the messages in them; add --yes to confirm", 2)
    settings = get_settings()
    url = settings.store.url
    # Opening a SQLite store creates its file: a store that does not exist knows no capabilities.
    no_store = url.startswith("sqlite://") and not Path(url.removeprefix("sqlite://")[1:]).exists()
    lines, code = run(_teardown(settings, capability or [], force=force, read_store=not no_store))
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


async def _teardown(
    settings: FabricSettings, named: list[str], *, force: bool, read_store: bool
) -> tuple[list[str], int]:
    """The shell of `fabric topology delete`: ask the store and the broker, plan, delete, report."""
    from fabric.topology import spec, teardown
    from fabric.transport.amqp import AmqpConnection

    capabilities: list[str] = []
    note = f"note: there is no state store at {settings.store.url}"
    if read_store:
        capabilities, note = await _known_capabilities(settings)
    capabilities = sorted({*capabilities, *named})
    try:
        topology = spec.build(settings.namespace, capabilities)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp:
        infos = await amqp.queue_infos(q.name for q in topology.queues)
        states = {
            name: None if info is None else teardown.QueueState(info.messages, info.consumers)
            for name, info in infos.items()
        }
        exists = await amqp.exchanges_exist(e.name for e in topology.exchanges)
        plan = teardown.plan(topology, states, exists, force=force)
        deletions = [
            *[await amqp.delete_queue(q, if_unused=not force, if_empty=not force) for q in plan.queues],
            *[await amqp.delete_exchange(e, if_unused=not force) for e in plan.exchanges],
        ]
    lines, code = teardown.report(settings.namespace, plan, deletions, capabilities)
    return ([note] if note else []) + lines, code


async def _known_capabilities(settings: FabricSettings) -> tuple[list[str], str]:
    """The capabilities the state store knows of, and a note when it could not be read."""
    from fabric.store import open_store

    try:
        async with open_store(settings.store.url, namespace=settings.namespace) as store:
            return await store.known_capabilities(), ""
    except FabricError as exc:
        return [], f"note: could not read the state store ({exc})"
