"""The ``fabric`` command line: thin wrappers that build settings and call the services.

Exit codes: 0 success; 1 the workflow failed or was cancelled; 2 bad usage, input or settings;
3 the broker or router cannot be reached; 4 the router rejected the submission or refused the command
(e.g. resuming a task that is not escalated); 5 not found (workflow or task).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fabric import cliformat
from fabric.client.client import FabricClient
from fabric.clihelp import FabricTyper
from fabric.errors import (
    ConfigError,
    FabricError,
    RequestRefused,
    SubmissionRejected,
    TopologyMismatch,
    TransportError,
    WaitTimeout,
    WorkflowNotFound,
)
from fabric.protocol.messages import Completed, TaskStatus
from fabric.settings import FabricSettings, load_settings

app = FabricTyper(
    help="fabric: run AI agents and other workers over RabbitMQ, reliably and observably.\n\n"
    "Settings come from FABRIC_* environment variables (FABRIC_AMQP_URL, FABRIC_NAMESPACE, "
    "FABRIC_STORE__URL, ...) and the profile file configs/<FABRIC_PROFILE>.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dead_app = FabricTyper(
    help="Inspect, replay or purge messages parked on the dead queue (NAMESPACE.dead).", no_args_is_help=True
)
app.add_typer(dead_app, name="dead")
topology_app = FabricTyper(
    help="Inspect or create the broker topology (exchanges and queues).", no_args_is_help=True
)
app.add_typer(topology_app, name="topology")
docs_app = FabricTyper(
    help="Documents generated from the code: the AsyncAPI description of the wire contract."
)
app.add_typer(docs_app, name="docs")

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _die(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings(**overrides: Any) -> FabricSettings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        _die(str(exc), 2)


def _logging(settings: FabricSettings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


def _run(coro: Any) -> Any:
    """Run ``coro``, turning fabric errors into clear messages and exit codes."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        _die(str(exc), 2)
    except TopologyMismatch as exc:
        _die(f"broker topology drift: {exc}", 2)
    except WorkflowNotFound as exc:
        _die(str(exc), 5)
    except SubmissionRejected as exc:
        _die(f"rejected ({exc.reason}): {exc.detail}", 4)
    except RequestRefused as exc:
        _die(f"refused: {exc}", 5 if exc.not_found else 4)
    except (TransportError, WaitTimeout) as exc:
        _die(str(exc), 3)
    except FabricError as exc:
        _die(str(exc), 2)


async def _until_signalled(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- processes ------------------------------------------------------------------------------------


@app.command()
def router() -> None:
    """Run the router: admit workflows, release ready tasks, record state, answer queries.

    Several routers may run against one broker; one is active, the others wait as standbys.
    Stops cleanly on SIGTERM or Ctrl-C.
    """
    from fabric.router.service import Router

    settings = _settings()
    _logging(settings)

    async def main() -> None:
        stop = asyncio.Event()
        async with Router(settings):
            await _until_signalled(stop)

    _run(main())


def _load_agent(target: str) -> Any:
    from fabric.worker.agent import Agent

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        _die(f"{target!r} is not of the form package.module:agent (for example workers.demo:agent)", 2)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        _die(f"cannot import module {module_name!r}: {exc}", 2)
    except Exception as exc:  # the module's own error: one line naming file:line, not a traceback
        _die(cliformat.import_failure(module_name, exc), 2)
    agent = getattr(module, attr, cliformat.MISSING)
    if not isinstance(agent, Agent):
        agents = [name for name, value in vars(module).items() if isinstance(value, Agent)]
        _die(cliformat.missing_agent(target, agents, agent), 2)
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

    settings = _settings()
    _logging(settings)
    agent = _load_agent(target)

    async def main() -> None:
        stop = asyncio.Event()
        async with Worker(agent, settings, concurrency=concurrency) as running:
            waiter = asyncio.create_task(_until_signalled(stop))
            stopped = asyncio.create_task(running.wait_stopped())
            await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if running.failed_fatally:
            raise TransportError("the worker could not consume its queues any more; see the log")

    _run(main())


# -- client commands ------------------------------------------------------------------------------


def _read_workflow(source: str, workflow_id: str | None) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        _die(f"cannot read {source}: {exc}", 2)
    try:
        doc = cliformat.parse_document(text, source)
    except cliformat.DocumentError as exc:
        _die(str(exc), 2)
    if isinstance(doc, list):
        doc = {"tasks": doc}
    elif isinstance(doc, dict) and "tasks" not in doc and "capability" in doc:
        doc = {"tasks": [{"id": "task", **doc}]}
    if not isinstance(doc, dict):
        _die(f"{source} must hold a workflow (an object with 'tasks'), a list of tasks, or one task", 2)
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
    settings = _settings()
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
            done = await _submit_and_watch(client, document, total, timeout, quiet=json_out)
            if json_out:
                console.print_json(data=done.model_dump(mode="json"))
            else:
                _print_completed(done)
            return 0 if done.status == "succeeded" else 1

    raise typer.Exit(_run(main()))


async def _submit_and_watch(
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


def _print_completed(done: Completed) -> None:
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
    settings = _settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            return await client.status(workflow_id)

    doc = _run(main())
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
    settings = _settings()

    async def main() -> Completed | None:
        async with FabricClient(settings) as client:
            if wait:
                return await client.wait(workflow_id, timeout_s=timeout)
            return await client.result(workflow_id)

    done = _run(main())
    if done is None:
        if json_out:
            console.print_json(data={"kind": "running", "workflow_id": workflow_id})
        else:
            console.print(f"workflow {workflow_id} is still running")
        return
    if json_out:
        console.print_json(data=done.model_dump(mode="json"))
    else:
        _print_completed(done)
    raise typer.Exit(0 if done.status == "succeeded" else 1)


@app.command()
def cancel(
    workflow_id: Annotated[str, typer.Argument(help="The workflow id.")],
    task: Annotated[str | None, typer.Option("--task", help="Only this task and what depends on it.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel a workflow, or one task and everything downstream of it. Running tasks are stopped."""
    settings = _settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            return await client.cancel(workflow_id, task)

    done = _run(main())
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
    settings = _settings()

    async def main() -> list[dict[str, Any]]:
        async with FabricClient(settings) as client:
            return await client.why(workflow_id, task_id)

    answers = _run(main())
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


# -- escalations ----------------------------------------------------------------------------------

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
        _die(f"cannot read --input {source}: {exc}", 2)
    if not text.strip():
        _die(f"--input {source} is empty; it must hold the new input as JSON or YAML", 2)
    try:
        return cliformat.parse_document(text, source, "--input")
    except cliformat.DocumentError as exc:
        _die(str(exc), 2)


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
    settings = _settings()
    new_input = _read_input(input_file) if input_file is not None else None

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            task_id = await _escalated_task(client, workflow_id, task)
            if input_file is None:
                return await client.resume(workflow_id, task_id)
            return await client.resume(workflow_id, task_id, input=new_input)

    done = _run(main())
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
    settings = _settings()

    async def main() -> dict[str, Any]:
        async with FabricClient(settings) as client:
            task_id = await _escalated_task(client, workflow_id, task)
            return await client.abort(workflow_id, task_id, reason=reason)

    done = _run(main())
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


@app.command()
def agents(json_out: JsonOpt = False) -> None:
    """List the agents seen through their heartbeats: state (alive, unhealthy with its reason, lost,
    stopped), each capability with its score (the consumer priority it consumes with) and breaker, load."""
    settings = _settings()

    async def main() -> list[dict[str, Any]]:
        async with FabricClient(settings) as client:
            return list(await client.query("agents") or [])

    found = _run(main())
    if json_out:
        console.print_json(data=found)
        return
    table, notes = cliformat.agents_table(found, time.time())
    console.print(table)
    for note in notes:
        console.print(f"* {note}", highlight=False, soft_wrap=True, markup=False)


# -- demo -----------------------------------------------------------------------------------------


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
    import os
    import subprocess
    import tempfile

    from fabric.topology import spec
    from fabric.transport.amqp import AmqpConnection

    settings = _settings(namespace=os.environ.get("FABRIC_NAMESPACE", "fabric-demo"))
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
            await ready(amqp, f"{settings.namespace}.router.submit", 1)
            for _ in range(workers):
                spawn("worker", "workers.demo:agent")
            await ready(amqp, f"{settings.namespace}.cap.demo.sum", workers)
            try:
                async with FabricClient(settings) as client:
                    document = demo_workflow()
                    started = time.monotonic()
                    done = await _submit_and_watch(client, document, len(document["tasks"]), 120, quiet=False)
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
                from workers.demo import agent as demo_agent

                await amqp.delete(spec.build(settings.namespace, demo_agent.capabilities))

    done = _run(main())
    _print_completed(done)
    raise typer.Exit(0 if done.status == "succeeded" else 1)


# -- dead letters ---------------------------------------------------------------------------------


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
    settings = _settings()

    async def main() -> list[dict[str, Any]]:
        async with _parked(settings, limit) as parked:
            return [view for view, _ in parked]

    found = _run(main())
    if json_out:
        console.print_json(data=found)
        return
    console.print(cliformat.dead_table(found, console.width))
    console.print(f"{len(found)} parked message(s) in namespace {settings.namespace!r}")


@dead_app.command("show")
def dead_show(message_id: Annotated[str, typer.Argument(help=PARKED_ID_HELP)]) -> None:
    """Show one parked message: every header and its decoded body."""
    from fabric.protocol import codec

    settings = _settings()

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

    found = _run(main())
    if found is None:
        _die(f"no parked message with id {message_id!r} (see `fabric dead list`)", 5)
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
        _die("give one message id, or --all", 2)
    settings = _settings()

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

    replayed, skipped = _run(main())
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
        _die("purging deletes parked messages for good; add --yes to confirm", 2)
    settings = _settings()

    async def main() -> int:
        purged = 0
        async with _parked(settings) as parked:
            for view, delivery in parked:
                if view["age_s"] is not None and view["age_s"] > older_than:
                    await delivery.ack()
                    purged += 1
        return purged

    console.print(f"purged {_run(main())} parked message(s)")


# -- topology -------------------------------------------------------------------------------------

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

    settings = _settings()

    async def main() -> list[str]:
        try:
            expected = spec.build(settings.namespace, capability or [])
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp:
            return await amqp.check(expected)

    problems = _run(main())
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

    settings = _settings()

    async def main() -> None:
        async with AmqpConnection(settings.amqp_url.get_secret_value(), name="fabric-cli") as amqp:
            await amqp.declare(spec.build(settings.namespace, capability or []))

    _run(main())
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
        _die("this deletes queues and the messages in them; add --yes to confirm", 2)
    settings = _settings()
    url = settings.store.url
    # Opening a SQLite store creates its file: a store that does not exist knows no capabilities.
    no_store = url.startswith("sqlite://") and not Path(url.removeprefix("sqlite://")[1:]).exists()
    lines, code = _run(_teardown(settings, capability or [], force=force, read_store=not no_store))
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


@docs_app.command("asyncapi")
def docs_asyncapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="yaml or json (default: from the file name, else yaml).")
    ] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of the exchanges, queues and messages (generated from the code).

    The namespace is FABRIC_NAMESPACE (default fabric). Example: fabric docs asyncapi -o asyncapi.yaml
    """
    from fabric.asyncapi import asyncapi_document

    settings = _settings()
    kind = fmt or ("json" if output is not None and output.suffix == ".json" else "yaml")
    if kind not in ("yaml", "json"):
        _die(f"--format must be yaml or json, not {kind!r}", 2)
    document = asyncapi_document(settings.namespace)
    text = (
        json.dumps(document, indent=2) + "\n"
        if kind == "json"
        else yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    )
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        _die(f"cannot write {output}: {exc}", 2)
    console.print(f"AsyncAPI document of namespace {settings.namespace!r} written to {output}")


def main() -> None:
    """Entry point of the ``fabric`` console script."""
    app()


if __name__ == "__main__":
    main()
