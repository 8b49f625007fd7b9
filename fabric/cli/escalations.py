"""Escalated tasks: ``fabric resume`` runs one again (optionally with a new input), ``fabric abort`` gives
up on it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fabric.cli import format as cliformat
from fabric.cli.app import JsonOpt, app, console, die, get_settings, run
from fabric.client.client import FabricClient
from fabric.errors import ConfigError, RequestRefused

EscalatedTaskOpt = Annotated[
    str | None,
    typer.Option("--task", help="The escalated task (may be left out when the workflow has only one)."),
]


async def _escalated_task(client: FabricClient, workflow_id: str, task: str | None) -> str:
    """The task named, or the workflow's only escalated task."""
    if task is not None:
        return task
    escalated = [a["task_id"] for a in await client.why(workflow_id) if a.get("reason") == "escalated"]
    if len(escalated) == 1:
        return str(escalated[0])
    if not escalated:
        raise RequestRefused(f"workflow {workflow_id} has no escalated task (see `fabric why {workflow_id}`)")
    raise ConfigError(
        f"workflow {workflow_id} has {len(escalated)} escalated tasks ({', '.join(escalated)}); "
        "name one with --task"
    )


def _read_input(source: str) -> Any:
    """A task input from a JSON or YAML file (- for standard input)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        die(f"cannot read --input {source}: {exc}", 2)
    if not text.strip():
        die(f"--input {source} is empty; it must hold the new input as JSON or YAML", 2)
    try:
        return cliformat.parse_document(text, source, "--input")
    except cliformat.DocumentError as exc:
        die(str(exc), 2)


@app.command()
def resume(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    task: EscalatedTaskOpt = None,
    input_file: Annotated[
        str | None,
        typer.Option("--input", help="A new input for the task: a JSON or YAML file, or - for stdin."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run an escalated task again, with a fresh attempt budget and optionally a new input.

    The resume (and the new input) is kept in the task's history (`fabric status`). Exits 4 when the
    task is not escalated, 5 when there is no such workflow or task.
    """
    settings = get_settings()
    new_input = _read_input(input_file) if input_file is not None else None

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            task_id = await _escalated_task(client, workflow_id, task)
            if input_file is None:
                return await client.resume(workflow_id, task_id)
            return await client.resume(workflow_id, task_id, input=new_input)

    done = run(main())
    if json_out:
        console.print_json(data=done)
    else:
        console.print(
            f"resumed {done['workflow_id']}/{done['task_id']}"
            + (" with a new input" if done.get("new_input") else "")
            + ": queued again from attempt 1",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def abort(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    task: EscalatedTaskOpt = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (recorded as the task's error).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Give up on an escalated task: it ends dead with the reason (a copy is parked on NAMESPACE.dead), the
    tasks depending on it end upstream_failed, and the workflow ends failed when nothing else remains.

    Exits 4 when the task is not escalated, 5 when there is no such workflow or task.
    """
    settings = get_settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            task_id = await _escalated_task(client, workflow_id, task)
            return await client.abort(workflow_id, task_id, reason=reason)

    done = run(main())
    if json_out:
        console.print_json(data=done)
        return
    skipped = done.get("upstream_failed") or []
    console.print(
        f"aborted {done['workflow_id']}/{done['task_id']} (dead); "
        f"{len(skipped)} dependent task(s) upstream_failed; workflow {done['workflow_status']}",
        highlight=False,
        soft_wrap=True,
    )
