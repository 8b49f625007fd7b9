"""``fabric dead``: list, show, replay or purge the messages parked on the dead queue."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer

from fabric.cli import format as cliformat
from fabric.cli.app import JsonOpt, app, console, die, err, get_settings, run
from fabric.cli.help import FabricTyper
from fabric.client.client import FabricClient
from fabric.errors import ConfigError, FabricError, RequestRefused, TransportError, WorkflowNotFound
from fabric.settings import FabricSettings

dead_app = FabricTyper(
    help="Inspect, replay or purge messages parked on the dead queue (NAMESPACE.dead).", no_args_is_help=True
)
app.add_typer(dead_app, name="dead")


def _parked_view(index: int, delivery: Any) -> dict[str, Any]:
    from fabric.protocol import headers as h

    hdrs = delivery.headers
    parked_ms = h.get_int(hdrs, h.PARKED_AT_MS, 0)
    parked_at = parked_ms / 1000 if parked_ms else None
    return {
        "id": delivery.message_id or f"#{index}",
        "reason": h.get_str(hdrs, h.DEAD_REASON, "?"),
        "workflow_id": h.get_str(hdrs, h.WORKFLOW_ID) or None,
        "task_id": h.get_str(hdrs, h.TASK_ID) or None,
        "attempt": h.get_int(hdrs, h.ATTEMPT, 0) or None,
        "capability": h.get_str(hdrs, h.ORIGINAL_ROUTING_KEY) or delivery.routing_key,
        "last_error": h.get_str(hdrs, h.LAST_ERROR),
        "parked_at": parked_at,
        "age_s": None if parked_at is None else round(time.time() - parked_at, 1),
    }


LimitOpt = Annotated[int, typer.Option(help="Look at this many parked messages at most.", min=1)]


@contextlib.asynccontextmanager
async def _parked(
    settings: FabricSettings, limit: int = 100_000
) -> AsyncIterator[list[tuple[dict[str, Any], Any]]]:
    """The parked messages of the namespace with their summaries; unsettled ones go back on exit."""
    from fabric.topology import names
    from fabric.transport.amqp import AmqpConnection

    async with (
        AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp,
        amqp.browse(names.dead_queue(settings.namespace), limit=limit) as deliveries,
    ):
        yield [(_parked_view(i, d), d) for i, d in enumerate(deliveries)]


PARKED_ID_HELP = (
    "The id shown by `fabric dead list`, or a unique part of it: its beginning, TASK/ATTEMPT or TASK."
)


def _pick_parked(wanted: str, views: list[dict[str, Any]]) -> str | None:
    """The one parked id ``wanted`` names (None: none does); several raise a ConfigError (exit 2)."""
    ids = cliformat.pick_ids(wanted, views)
    if len(ids) > 1:
        raise ConfigError(
            f"{wanted!r} names {len(ids)} parked messages; give one of: "
            + ", ".join(ids[:20])
            + (" ..." if len(ids) > 20 else "")
        )
    return ids[0] if ids else None


@dead_app.command("list")
def dead_list(limit: LimitOpt = 1000, json_out: JsonOpt = False) -> None:
    """List parked messages: why each was parked, its task, attempts and last error. Changes nothing."""
    settings = get_settings()

    async def main() -> list[dict[str, Any]]:
        async with _parked(settings, limit) as parked:
            return [view for view, _ in parked]

    found = run(main())
    if json_out:
        console.print_json(data=found)
        return
    console.print(cliformat.dead_table(found, console.width))
    console.print(f"{len(found)} parked message(s) in namespace {settings.namespace!r}")


@dead_app.command("show")
def dead_show(message_id: Annotated[str, typer.Argument(help=PARKED_ID_HELP)]) -> None:
    """Show one parked message: every header and its decoded body."""
    from fabric.protocol import codec

    settings = get_settings()

    async def main() -> dict[str, Any] | None:
        async with _parked(settings) as parked:
            wanted = _pick_parked(message_id, [view for view, _ in parked])
            for view, delivery in parked:
                if view["id"] == wanted:
                    try:
                        body: Any = codec.decode(delivery.body, delivery.content_type)
                    except FabricError:
                        body = repr(delivery.body[:2000])
                    return {**view, "headers": delivery.headers, "body": body}
        return None

    found = run(main())
    if found is None:
        die(f"no parked message with id {message_id!r} (see `fabric dead list`)", 5)
    console.print_json(data=found, default=repr)


@dead_app.command("replay")
def dead_replay(
    message_id: Annotated[str | None, typer.Argument(help=PARKED_ID_HELP)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every parked task.")] = False,
    capability: Annotated[str | None, typer.Option(help="With --all: only this capability's tasks.")] = None,
) -> None:
    """Run parked tasks again from attempt 1 (the router records the replay), then remove them from the
    dead queue. Their skipped dependents wait again and their workflow runs on."""
    if (message_id is None) == (not all_):
        die("give one message id, or --all", 2)
    settings = get_settings()

    async def main() -> tuple[int, list[str]]:
        replayed, skipped = 0, []
        async with FabricClient(settings) as client, _parked(settings) as parked:
            wanted = None if message_id is None else _pick_parked(message_id, [v for v, _ in parked])
            for view, delivery in parked:
                if wanted is not None and view["id"] != wanted:
                    continue
                if capability is not None and view["capability"] != capability:
                    continue
                if not view["task_id"]:
                    skipped.append(f"{view['id']}: not a task message ({view['reason']})")
                    continue
                try:
                    await client.replay(view["workflow_id"], view["task_id"])
                except (TransportError, WorkflowNotFound, RequestRefused) as exc:
                    skipped.append(f"{view['id']}: {exc}")
                    continue
                await delivery.ack()  # the router republished the task from its record
                replayed += 1
        return replayed, skipped

    replayed, skipped = run(main())
    for line in skipped:
        err.print(f"[yellow]skipped[/] {line}", highlight=False)
    console.print(f"replayed {replayed} task(s)")
    if message_id is not None and not replayed:
        raise typer.Exit(5 if not skipped else 1)


@dead_app.command("purge")
def dead_purge(
    older_than: Annotated[
        float,
        typer.Option("--older-than", help="Only messages parked more than this many seconds ago.", min=0),
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete them.")] = False,
) -> None:
    """Delete parked messages older than --older-than seconds (they are gone for good). Needs --yes."""
    if not yes:
        die("purging deletes parked messages for good; add --yes to confirm", 2)
    settings = get_settings()

    async def main() -> int:
        purged = 0
        async with _parked(settings) as parked:
            for view, delivery in parked:
                if view["age_s"] is not None and view["age_s"] > older_than:
                    await delivery.ack()
                    purged += 1
        return purged

    console.print(f"purged {run(main())} parked message(s)")
