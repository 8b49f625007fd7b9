"""The commands about one workflow: ``fabric submit``, ``status``, ``result``, ``cancel`` and ``why``, and
the progress and result printing that ``fabric demo`` shares."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fabric.cli import format as cliformat
from fabric.cli.app import JsonOpt, app, console, die, err, get_settings, run
from fabric.client.client import FabricClient
from fabric.errors import FabricError, WaitTimeout
from fabric.protocol.messages import Completed, TaskStatus


def _read_workflow(source: str, workflow_id: str | None) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        die(f"cannot read {source}: {exc}", 2)
    try:
        doc = cliformat.parse_document(text, source)
    except cliformat.DocumentError as exc:
        die(str(exc), 2)
    if isinstance(doc, list):
        doc = {"tasks": doc}
    elif isinstance(doc, dict) and "tasks" not in doc and "capability" in doc:
        doc = {"tasks": [{"id": "task", **doc}]}
    if not isinstance(doc, dict):
        die(f"{source} must hold a workflow (an object with 'tasks'), a list of tasks, or one task", 2)
    if workflow_id:
        doc["workflow_id"] = workflow_id
    return doc


@app.command()
def submit(
    source: Annotated[str, typer.Argument(help="Workflow file (JSON or YAML), or - for standard input.")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Show progress and print the result.")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    workflow_id: Annotated[
        str | None, typer.Option("--id", help="Workflow id (makes resubmission idempotent).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit a workflow: a JSON/YAML object with 'tasks', a list of tasks, or a single task.

    Example file:  {"tasks": [{"id": "a", "capability": "demo.echo", "input": "hi"}]}

    Exits 0 when accepted (with --wait: when it succeeded), 1 when it failed, 4 when rejected.
    """
    settings = get_settings()
    document = _read_workflow(source, workflow_id)
    total = len(document.get("tasks") or [])

    async def main() -> int:
        async with FabricClient(settings) as client:
            if not wait:
                accepted = await client.submit(document)
                if json_out:
                    console.print_json(data=accepted.model_dump(mode="json"))
                else:
                    console.print(f"accepted {accepted.workflow_id} ({accepted.tasks} tasks)")
                return 0
            done = await submit_and_watch(client, document, total, timeout, quiet=json_out)
            if json_out:
                console.print_json(data=done.model_dump(mode="json"))
            else:
                print_completed(done)
            return 0 if done.status == "succeeded" else 1

    raise typer.Exit(run(main()))


async def submit_and_watch(
    client: FabricClient, document: dict[str, Any], total: int, timeout: float | None, *, quiet: bool
) -> Completed:
    finished: set[str] = set()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=quiet or not err.is_terminal,
    ) as progress:
        bar = progress.add_task("submitting", total=total, last="")

        def on_task(note: dict[str, Any]) -> None:
            status = note.get("status", "")
            if status in {s.value for s in TaskStatus if s.terminal}:
                finished.add(str(note.get("task_id")))
            progress.update(bar, completed=len(finished), last=f"{note.get('task_id')}: {status}")

        started = time.monotonic()
        accepted = await client.submit(document, on_task=on_task)
        progress.update(bar, description=accepted.workflow_id)
        if not quiet and not err.is_terminal:
            err.print(f"accepted {accepted.workflow_id} ({accepted.tasks} tasks); waiting")
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        watcher = asyncio.create_task(_warn_unserved(client, accepted.workflow_id))
        try:
            return await client.wait(accepted.workflow_id, timeout_s=remaining)
        except WaitTimeout as exc:  # say the timeout that was given, not what was left of it
            raise WaitTimeout(f"workflow {accepted.workflow_id} did not finish within {timeout:g}s") from exc
        finally:
            watcher.cancel()


async def _warn_unserved(client: FabricClient, workflow_id: str) -> None:
    """Warn once per capability the workflow waits for that no live agent serves (asked every few s)."""
    from fabric.client.unserved import CHECK_INTERVAL_S, unserved_warnings

    warned: set[str] = set()
    while True:
        with contextlib.suppress(FabricError):  # the router may be busy or restarting: ask again later
            for warning in unserved_warnings(await client.why(workflow_id), warned):
                warned.add(warning.capability)
                err.print(f"[yellow]warning:[/] {escape(warning.message)}", highlight=False, soft_wrap=True)
        await asyncio.sleep(CHECK_INTERVAL_S)


def print_completed(done: Completed) -> None:
    colour = {"succeeded": "green", "failed": "red"}.get(str(done.status), "yellow")
    console.print(f"workflow [bold]{done.workflow_id}[/] [{colour}]{done.status}[/]", highlight=False)
    table = Table("task", "status", "attempts", "agent", "result / error")
    for task_id, outcome in done.tasks.items():
        shown = (
            f"{outcome.error.type}: {outcome.error.message}"
            if outcome.error
            else json.dumps(outcome.result, default=repr, ensure_ascii=False)
        )
        table.add_row(task_id, str(outcome.status), str(outcome.attempts), outcome.agent or "-", shown[:200])
    console.print(table)
    for task_id, outcome in done.tasks.items():
        if outcome.error and outcome.status in (TaskStatus.FAILED, TaskStatus.DEAD):
            console.print(
                f"[red]✗[/] task {task_id} {outcome.status} after {outcome.attempts} attempt(s): "
                f"{outcome.error.type}: {outcome.error.message}",
                soft_wrap=True,
                highlight=False,
            )


@app.command()
def status(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a workflow's status and each task's status, attempts, agent and error."""
    settings = get_settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            return await client.status(workflow_id)

    doc = run(main())
    if json_out:
        console.print_json(data=doc)
        return
    console.print(f"workflow [bold]{doc['workflow_id']}[/] {doc['status']}  {doc['counts']}", highlight=False)
    table = Table("task", "capability", "status", "attempts", "agent", "error")
    for task_id, task in doc["tasks"].items():
        error = task.get("error") or {}
        table.add_row(
            task_id,
            task["capability"],
            task["status"],
            str(task["attempts"]),
            task.get("agent") or "-",
            f"{error.get('type')}: {error.get('message')}" if error else "",
        )
    console.print(table)
    for task_id, task in doc["tasks"].items():
        for entry in task.get("history") or []:
            error = entry.get("error") or {}
            what = f"{error.get('type')}: {error.get('message')}" if error else ""
            if entry.get("late"):
                # An outcome reported after its attempt was given up: recorded, not counted.
                what = f"late {entry['late']} ignored" + (f" ({what})" if what else "")
            console.print(
                f"  {task_id} attempt {entry.get('attempt')} on {entry.get('agent')}: {what}",
                soft_wrap=True,
                highlight=False,
            )


@app.command()
def result(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until it finishes.")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a finished workflow's results (exit 1 if it failed; 0 and a note while it runs)."""
    settings = get_settings()

    async def main() -> Completed | None:
        async with FabricClient(settings) as client:
            if wait:
                return await client.wait(workflow_id, timeout_s=timeout)
            return await client.result(workflow_id)

    done = run(main())
    if done is None:
        if json_out:
            console.print_json(data={"kind": "running", "workflow_id": workflow_id})
        else:
            console.print(f"workflow {workflow_id} is still running")
        return
    if json_out:
        console.print_json(data=done.model_dump(mode="json"))
    else:
        print_completed(done)
    raise typer.Exit(0 if done.status == "succeeded" else 1)


@app.command()
def cancel(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    task: Annotated[str | None, typer.Option("--task", help="Only this task and what depends on it.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel a workflow, or one task and everything downstream of it. Running tasks are stopped."""
    settings = get_settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            return await client.cancel(workflow_id, task)

    done = run(main())
    if json_out:
        console.print_json(data=done)
    else:
        console.print(
            f"cancelled {len(done['cancelled'])} task(s); workflow {workflow_id} is {done['status']}"
        )


@app.command()
def why(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    task_id: Annotated[str | None, typer.Argument(help="Only this task.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Say why each unfinished task is not running yet: waiting_on, queued, no_agent, circuit_open,
    running_on, backoff_until, escalated (waits for `fabric resume` or `fabric abort`)."""
    settings = get_settings()

    async def main() -> list[dict[str, Any]]:
        async with FabricClient(settings) as client:
            return await client.why(workflow_id, task_id)

    answers = run(main())
    if json_out:
        console.print_json(data=answers)
        return
    if not answers:
        console.print(f"workflow {workflow_id}: every task has finished")
    for answer in answers:
        console.print(
            f"{answer['task_id']}: [bold]{answer['reason']}[/] {answer['detail']}",
            soft_wrap=True,
            highlight=False,
        )
