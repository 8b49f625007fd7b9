"""`fabric resume` and `fabric abort` against router and worker subprocesses on the real broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def review(workflow_id: str) -> dict[str, Any]:
    """demo.review escalates until an operator approves; demo.echo depends on it."""
    return {
        "workflow_id": workflow_id,
        "tasks": [
            {"id": "review", "capability": "demo.review", "input": {"note": "check the totals"}},
            {"id": "publish", "capability": "demo.echo", "input": "go", "depends_on": ["review"]},
        ],
    }


async def cli(fleet: Fleet, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, fleet.env, *args, stdin=stdin)


async def escalated(fleet: Fleet, workflow_id: str) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        why = await cli(fleet, "why", workflow_id, "--json")
        assert why.returncode == 0, why.stderr
        answers: list[dict[str, Any]] = json.loads(why.stdout)
        return answers if any(a["reason"] == "escalated" for a in answers) else None

    answers: list[dict[str, Any]] = await eventually(check, what=f"{workflow_id} escalated")
    return answers


async def test_resume_with_a_new_input_completes_the_workflow(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.router()
    await fleet.worker("w1", queue="demo.review")
    submitted = await cli(fleet, "submit", "-", stdin=json.dumps(review("cli-esc-1")))
    assert submitted.returncode == 0, submitted.stderr

    answers = {a["task_id"]: a for a in await escalated(fleet, "cli-esc-1")}
    assert answers["review"]["reason"] == "escalated"
    assert "check the totals" in answers["review"]["detail"]
    assert answers["publish"]["reason"] == "waiting_on"
    text = await cli(fleet, "why", "cli-esc-1")
    assert "escalated" in text.stdout
    assert "fabric resume cli-esc-1 --task review" in text.stdout
    status = await cli(fleet, "status", "cli-esc-1", "--json")
    doc = json.loads(status.stdout)
    assert doc["status"] == "running"
    assert doc["tasks"]["review"]["status"] == "escalated"

    # Refusals are clear, and their exit codes are those of the other commands.
    missing = await cli(fleet, "resume", "cli-esc-1", "--task", "nope")
    assert missing.returncode == 5, missing.stderr
    assert "no task 'nope'" in missing.stderr
    waiting = await cli(fleet, "resume", "cli-esc-1", "--task", "publish")
    assert waiting.returncode == 4, waiting.stderr
    assert "not escalated" in waiting.stderr
    unknown = await cli(fleet, "resume", "no-such-workflow", "--task", "review")
    assert unknown.returncode == 5
    broken = tmp_path / "broken.json"
    broken.write_text('{"approved": tru')
    malformed = await cli(fleet, "resume", "cli-esc-1", "--task", "review", "--input", str(broken))
    assert malformed.returncode == 2
    assert "broken.json is not valid JSON: Expecting value at line 1 column 14" in malformed.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    assert (await cli(fleet, "resume", "cli-esc-1", "--input", str(empty))).returncode == 2
    absent = await cli(fleet, "resume", "cli-esc-1", "--input", str(tmp_path / "absent.json"))
    assert absent.returncode == 2
    assert "cannot read" in absent.stderr

    # The real thing: YAML input, the only escalated task found without --task.
    approved = tmp_path / "approved.yaml"
    approved.write_text("approved: true\nby: ops\n")
    resumed = await cli(fleet, "resume", "cli-esc-1", "--input", str(approved))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed cli-esc-1/review with a new input" in resumed.stdout
    result = await cli(fleet, "result", "cli-esc-1", "--wait", "--timeout", "60", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    done = json.loads(result.stdout)
    assert done["tasks"]["review"]["result"] == {"approved": True, "by": "ops"}
    assert done["tasks"]["publish"]["status"] == "succeeded"
    history = await cli(fleet, "status", "cli-esc-1")
    assert "operator: Resumed: resumed by an operator after 1 attempt(s) with a new input" in history.stdout
    again = await cli(fleet, "resume", "cli-esc-1", "--task", "review")
    assert again.returncode == 4
    assert "is succeeded, not escalated" in again.stderr


async def test_abort_fails_the_workflow_and_its_dependents(fleet: Fleet) -> None:
    await fleet.router()
    await fleet.worker("w1", queue="demo.review")
    assert (await cli(fleet, "submit", "-", stdin=json.dumps(review("cli-esc-2")))).returncode == 0
    await escalated(fleet, "cli-esc-2")

    aborted = await cli(fleet, "abort", "cli-esc-2", "--task", "review", "--reason", "totals are wrong")
    assert aborted.returncode == 0, aborted.stderr
    assert "1 dependent task(s) upstream_failed; workflow failed" in aborted.stdout
    result = await cli(fleet, "result", "cli-esc-2", "--json")
    assert result.returncode == 1
    done = json.loads(result.stdout)
    assert done["status"] == "failed"
    assert done["tasks"]["review"]["status"] == "dead"
    assert done["tasks"]["review"]["error"] == {"type": "Aborted", "message": "totals are wrong"}
    assert done["tasks"]["publish"]["status"] == "upstream_failed"
    parked = json.loads((await cli(fleet, "dead", "list", "--json")).stdout)
    assert [(p["task_id"], p["reason"]) for p in parked] == [("review", "totals are wrong")]
    twice = await cli(fleet, "abort", "cli-esc-2", "--task", "review")
    assert twice.returncode == 4
    assert "is dead, not escalated" in twice.stderr
    nothing = await cli(fleet, "abort", "cli-esc-2")
    assert nothing.returncode == 4
    assert "has no escalated task" in nothing.stderr
