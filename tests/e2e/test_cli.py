"""The CLI against router and worker subprocesses on the real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def fan(width: int, seconds: float) -> dict[str, object]:
    tasks: list[dict[str, object]] = [{"id": "root", "capability": "demo.sum", "input": 1}]
    tasks += [
        {"id": f"s{i}", "capability": "demo.sleep", "input": {"seconds": seconds}, "depends_on": ["root"]}
        for i in range(width)
    ]
    tasks.append(
        {"id": "join", "capability": "demo.sum", "input": 0, "depends_on": [f"s{i}" for i in range(width)]}
    )
    return {"tasks": tasks}


async def test_submit_wait_runs_on_two_workers(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.router()
    await fleet.worker("w1", concurrency=2)
    await fleet.worker("w2", concurrency=2)
    path = tmp_path / "fan.json"
    path.write_text(json.dumps(fan(16, 0.2)))
    done = run_cli(fleet.env, "submit", str(path), "--wait", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "succeeded"
    assert doc["tasks"]["join"]["result"] == pytest.approx(16 * 0.2)
    sleepers = {doc["tasks"][f"s{i}"]["agent"] for i in range(16)}
    assert sleepers == {"w1", "w2"}, "tasks of one capability are spread over both workers"
    # status and result of the finished workflow, as JSON and as text
    status = run_cli(fleet.env, "status", doc["workflow_id"], "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"succeeded": 18}
    result = run_cli(fleet.env, "result", doc["workflow_id"])
    assert result.returncode == 0
    assert "succeeded" in result.stdout


async def test_failed_workflow_exits_nonzero_and_says_why(fleet: Fleet) -> None:
    await fleet.router()
    await fleet.worker("w1")
    workflow = {
        "tasks": [
            {
                "id": "fetch",
                "capability": "demo.fail",
                "input": "upstream API returned 503",
                "max_attempts": 1,
            },
            {"id": "summarize", "capability": "demo.echo", "depends_on": ["fetch"]},
        ]
    }
    done = run_cli(fleet.env, "submit", "-", "--wait", stdin=json.dumps(workflow))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed" in done.stdout
    assert "fetch" in done.stdout
    assert "upstream API returned 503" in done.stdout
    assert "upstream_failed" in done.stdout


async def test_cli_errors_are_clear(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.router()
    rejected = run_cli(
        fleet.env,
        "submit",
        "-",
        stdin='{"tasks": [{"id": "a", "capability": "demo.echo", "depends_on": ["a"]}]}',
    )
    assert rejected.returncode == 4
    assert "cycle" in rejected.stderr
    missing = run_cli(fleet.env, "status", "no-such-workflow")
    assert missing.returncode == 5
    assert "no-such-workflow" in missing.stderr
    bad_file = run_cli(fleet.env, "submit", str(tmp_path / "nope.json"))
    assert bad_file.returncode == 2
    assert "nope.json" in bad_file.stderr
    bad_setting = run_cli({**fleet.env, "FABRIC_WORKER__CONCURRENCY": "lots"}, "worker", "workers.demo:agent")
    assert bad_setting.returncode == 2
    assert "FABRIC_WORKER__CONCURRENCY" in bad_setting.stderr
    bad_target = run_cli(fleet.env, "worker", "workers.nothere:agent")
    assert bad_target.returncode == 2
    assert "workers.nothere" in bad_target.stderr
