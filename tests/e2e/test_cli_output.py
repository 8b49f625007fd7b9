"""What the real `fabric` CLI prints, on the real broker: full parked ids at 80 and 160 columns, parked
messages picked by a part of their id, non-ASCII text printed as is."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import Fleet, run_cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]

MESSAGE = "upstream API said: naïve … ✓ 503"


async def cli(
    fleet: Fleet, *args: str, columns: int = 80, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**fleet.env, "COLUMNS": str(columns)}
    return await asyncio.to_thread(run_cli, env, *args, stdin=stdin)


async def _parked(fleet: Fleet, count: int) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        listed = await cli(fleet, "dead", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        found: list[dict[str, Any]] = json.loads(listed.stdout)
        return found if len(found) >= count else None

    parked: list[dict[str, Any]] = await eventually(check, what=f"{count} parked messages")
    return parked


async def test_parked_ids_are_shown_whole_and_picked_by_part(fleet: Fleet) -> None:
    await fleet.router()
    await fleet.worker("w1", queue="demo.fail")
    workflow_id = f"wf-{uuid.uuid4().hex}"
    flow = {
        "workflow_id": workflow_id,
        "tasks": [
            {"id": task, "capability": "demo.fail", "input": MESSAGE, "max_attempts": 1}
            for task in ("score-3", "fetch")
        ],
    }
    submitted = await cli(fleet, "submit", "-", stdin=json.dumps(flow))
    assert submitted.returncode == 0, submitted.stderr
    parked = await _parked(fleet, 2)
    ids = sorted(p["id"] for p in parked)
    assert ids == [f"{workflow_id}/fetch/1", f"{workflow_id}/score-3/1"]

    for columns in (80, 160):
        listed = await cli(fleet, "dead", "list", columns=columns)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert all(len(line) <= columns for line in lines), listed.stdout
        for full in ids:
            assert any(full in line for line in lines), f"{full} cut at {columns} columns:\n{listed.stdout}"
        assert "…" in listed.stdout  # the last error, printed as is

    for part in ("score-3/1", "score-3", f"{workflow_id}/sc"):
        shown = await cli(fleet, "dead", "show", part)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["id"] == f"{workflow_id}/score-3/1"
        assert "naïve … ✓" in shown.stdout

    ambiguous = await cli(fleet, "dead", "show", workflow_id[:10])
    assert ambiguous.returncode == 2, ambiguous.stderr
    assert "names 2 parked messages" in ambiguous.stderr
    for full in ids:
        assert full in ambiguous.stderr
    missing = await cli(fleet, "dead", "show", "no-such-task/9")
    assert missing.returncode == 5, missing.stderr
    ambiguous_replay = await cli(fleet, "dead", "replay", workflow_id)
    assert ambiguous_replay.returncode == 2, ambiguous_replay.stderr

    replayed = await cli(fleet, "dead", "replay", "fetch/1")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 task(s)" in replayed.stdout


async def test_non_ascii_results_are_printed_as_is(fleet: Fleet) -> None:
    await fleet.router()
    await fleet.worker("w1")
    flow = {"tasks": [{"id": "say", "capability": "demo.echo", "input": "naïve … ✓"}]}

    done = await cli(fleet, "submit", "-", "--wait", stdin=json.dumps(flow))

    assert done.returncode == 0, done.stderr
    assert "naïve … ✓" in done.stdout
    assert "\\u" not in done.stdout
