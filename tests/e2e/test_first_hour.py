"""A new user's first hour, as the README tells it: the ten-line agent, the shipped examples, `submit --wait`
and the router's start line, against router and worker subprocesses on the real broker.

Every file in examples/ has an entry in :data:`DOCUMENTED` (what serves it and its outcome, as README's
table of examples says); a new example without one fails :func:`test_every_example_is_documented`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric.settings import FabricSettings
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually
from tests.e2e.conftest import Fleet, Proc, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"

#: The ten-line agent's capability (README, "An agent in ten lines").
README_CAPABILITY = "llm.summarize"


@dataclass(frozen=True)
class Outcome:
    """What serves an example, and how it ends."""

    #: ``demo``: ``fabric worker workers.demo:agent``; ``readme``: the ten-line agent of the README.
    served_by: str
    status: str
    #: Task id -> its result.
    results: dict[str, Any]


_RESEARCH = "RabbitMQ keeps every task in a durable queue until an agent has finished it. … (None)"

#: Every file in examples/: what serves it and its documented outcome (README's table of examples).
DOCUMENTED: dict[str, Outcome] = {
    "diamond.json": Outcome("demo", "succeeded", {"a": 1, "b": 11, "c": 101, "d": 112}),
    "research.yaml": Outcome("demo", "succeeded", {"fetch": 4, "think": 0.5, "score": 10, "report": "done"}),
    "summarize.json": Outcome(
        "readme",
        "succeeded",
        {"research": _RESEARCH, "summary": f"fabric runs agents anywhere and loses nothing. … ({_RESEARCH})"},
    ),
}


def readme_agent_source() -> str:
    """The code of README's "An agent in ten lines", exactly as a user copies it."""
    found = re.search(r"```python\n(# myagents\.py\n.*?)```", README.read_text(), re.DOTALL)
    assert found, "README has no ten-line agent (a python block starting with '# myagents.py')"
    return found.group(1)


def test_every_example_is_documented() -> None:
    shipped = sorted(path.name for path in EXAMPLES.iterdir() if path.is_file())
    assert sorted(DOCUMENTED) == shipped, "give each file in examples/ an entry in DOCUMENTED and README"
    readme = README.read_text()
    for name in shipped:
        assert re.search(rf"^\| `examples/{re.escape(name)}` \|", readme, re.MULTILINE), (
            f"README's table of examples has no row for examples/{name}"
        )


def test_the_readme_next_step_submits_an_example_the_ten_line_agent_serves() -> None:
    readme = README.read_text()
    after_agent = readme[readme.index("# myagents.py") :]
    step = re.search(r"fabric submit examples/(\S+) --wait", after_agent)
    assert step, "README's next step after the ten-line agent submits no example"
    assert DOCUMENTED[step.group(1)].served_by == "readme"
    assert f'"{README_CAPABILITY}"' in readme_agent_source()


async def start_readme_agent(fleet: Fleet, broker: AmqpConnection, tmp_path: Path) -> Proc:
    """``fabric worker myagents:agent`` with README's ten-line agent saved as myagents.py."""
    folder = tmp_path / "first-hour"
    folder.mkdir()
    (folder / "myagents.py").write_text(readme_agent_source())
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    proc = fleet.spawn("readme-agent", "worker", "myagents:agent", "--concurrency", "8", PYTHONPATH=path)
    queue = f"{fleet.settings.namespace}.cap.{README_CAPABILITY}"

    async def consuming() -> bool:
        assert proc.alive(), f"the README agent exited:\n{proc.log()}"
        info = await broker.queue_info(queue)
        return info is not None and info.consumers > 0

    await eventually(consuming, timeout=60, interval=0.1, what="the README agent consuming")
    return proc


async def test_every_example_reaches_its_documented_outcome(
    fleet: Fleet, broker: AmqpConnection, tmp_path: Path, extra_caps: list[str]
) -> None:
    extra_caps.append(README_CAPABILITY)
    await fleet.router()
    await fleet.worker("demo")
    await start_readme_agent(fleet, broker, tmp_path)
    for name, expected in DOCUMENTED.items():
        done = run_cli(fleet.env, "submit", str(EXAMPLES / name), "--wait", "--json", "--timeout", "120")
        assert done.returncode == (0 if expected.status == "succeeded" else 1), f"{name}: {done.stderr}"
        document = json.loads(done.stdout)
        assert document["status"] == expected.status, f"{name}: {document}"
        results = {task_id: task["result"] for task_id, task in document["tasks"].items()}
        assert results == expected.results, name


async def test_submit_wait_warns_at_once_about_an_unserved_capability_and_keeps_waiting(
    fleet: Fleet, tmp_path: Path
) -> None:
    await fleet.router()
    workflow = tmp_path / "echo.json"
    workflow.write_text(json.dumps({"tasks": [{"id": "hello", "capability": "demo.echo", "input": "hi"}]}))
    submitter = fleet.spawn(
        "submit", "submit", str(workflow), "--wait", "--timeout", "300", "--id", "wf-lonely"
    )
    warning = "no live agent serves 'demo.echo' (task hello waits for one); still waiting"
    await eventually(lambda: warning in submitter.log(), timeout=30, what="the unserved warning")
    assert submitter.alive(), "it keeps waiting after the warning"
    why = run_cli(fleet.env, "why", "wf-lonely", "--json")
    assert why.returncode == 0, why.stderr
    [answer] = json.loads(why.stdout)
    assert (answer["reason"], answer["capability"]) == ("no_agent", "demo.echo")
    await fleet.worker("demo")  # now an agent serves it: the wait ends with the result
    await eventually(lambda: not submitter.alive(), timeout=60, what="submit --wait to finish")
    log = submitter.log()
    assert submitter.wait() == 0, log
    assert "succeeded" in log
    assert log.count("no live agent serves") == 1, "each capability is warned about once"


async def test_router_start_line_names_the_dashboard(fleet: Fleet, settings: FabricSettings) -> None:
    router = await fleet.router()
    line = await eventually(
        lambda: re.search(r"dashboard on (http://127\.0\.0\.1:\d+/), HTTP API on \S+/api/v1", router.log()),
        timeout=30,
        what="the router's start line",
    )
    async with httpx.AsyncClient() as http:
        page = await http.get(line.group(1))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert settings.namespace in page.text


async def test_a_worker_with_the_default_port_leaves_the_routers_port_free(fleet: Fleet) -> None:
    # "Router in one terminal, worker in another": started first, or left running while the router
    # restarts, a worker with no FABRIC_HTTP__PORT must not take the router's default 8080.
    env = {k: v for k, v in fleet.env.items() if k != "FABRIC_HTTP__PORT"}
    worker = Proc("worker", ["worker", "workers.demo:agent"], env, fleet.logs)
    fleet.procs.append(worker)
    found = await eventually(
        lambda: re.search(r"health endpoints on http://127\.0\.0\.1:(\d+)/healthz", worker.log()),
        timeout=30,
        what="the worker's health line",
    )
    assert int(found.group(1)) != 8080, worker.log()
