"""``fabric agents``: the agents the router knows of through their heartbeats."""

from __future__ import annotations

import time
from typing import Any

from fabric.cli import format as cliformat
from fabric.cli.app import JsonOpt, app, console, get_settings, run
from fabric.client.client import FabricClient


@app.command()
def agents(json_out: JsonOpt = False) -> None:
    """List the agents seen through their heartbeats: state (alive, unhealthy with its reason, lost,
    stopped), each capability with its score (the consumer priority it consumes with) and breaker, load."""
    settings = get_settings()

    async def main() -> list[dict[str, Any]]:
        async with FabricClient(settings) as client:
            return list(await client.query("agents") or [])

    found = run(main())
    if json_out:
        console.print_json(data=found)
        return
    table, notes = cliformat.agents_table(found, time.time())
    console.print(table)
    for note in notes:
        console.print(f"* {note}", highlight=False, soft_wrap=True, markup=False)
