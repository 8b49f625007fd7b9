"""The demo agent: run it with ``fabric worker workers.demo:agent``."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from fabric import Agent, Escalate, Task

agent = Agent("demo")


@agent.handler("demo.echo")
async def echo(task: Task) -> Any:
    """Return the input unchanged."""
    return task.input


@agent.handler("demo.sum")
def add(task: Task) -> float:
    """Sum the numeric input (a number or a list of numbers) and every upstream result."""
    total: float = 0
    values: list[Any] = [task.input, *task.upstream.values()]
    for value in values:
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise TypeError(f"demo.sum adds numbers; got {item!r}")
            total += item
    return int(total) if float(total).is_integer() else total


@agent.handler("demo.flaky")
async def flaky(task: Task) -> Any:
    """Fail the first ``fail_times`` attempts, then return ``result``.

    Input: ``{"fail_times": N, "result": X}``.
    """
    spec = task.input if isinstance(task.input, dict) else {}
    fail_times = int(spec.get("fail_times", 1))
    if task.attempt <= fail_times:
        raise RuntimeError(f"flaky failure on attempt {task.attempt} of {fail_times} planned")
    return spec.get("result", task.attempt)


@agent.handler("demo.sleep")
async def sleep(task: Task) -> float:
    """Sleep ``seconds`` (input ``{"seconds": S}`` or a number) and return it."""
    spec = task.input
    seconds = float(spec.get("seconds", 1) if isinstance(spec, dict) else (1 if spec is None else spec))
    await asyncio.sleep(seconds)
    return seconds


@agent.handler("demo.fail")
async def fail(task: Task) -> None:
    """Always fail with the message given as input."""
    raise ValueError(str(task.input or "demo.fail always fails"))


@agent.handler("demo.review")
async def review(task: Task) -> Any:
    """Hand the task to an operator (``Escalate``) unless its input says ``approved: true``; then return
    the input. ``fabric resume WF --task T --input approved.json`` with ``{"approved": true}`` completes it.
    """
    spec = task.input if isinstance(task.input, dict) else {}
    if spec.get("approved") is not True:
        raise Escalate(f"needs an operator's review: {spec.get('note') or 'not approved'}")
    return task.input


@agent.handler("demo.crash")
def crash(task: Task) -> None:
    """Kill this worker process at once (as a segfault or OOM kill would)."""
    os.kill(os.getpid(), signal.SIGKILL)
