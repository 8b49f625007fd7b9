"""A worker's background tasks, by name, and how a task is stopped.

Stopping them is part of closing the worker, and the close may run in one of them (the stop after a
fatal error drains and closes the worker from a background task): a task never cancels itself. A task
stopped ends cancelled and says nothing; one that failed says so in the log, with its name.

Example:
    >>> background = Background()
    >>> background.start("rescore", rescore())
    >>> background.running("rescore")
    True
    >>> await background.stop_all()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

log = logging.getLogger("fabric.worker")

#: How long closing waits for the background tasks it cancelled (a cancelled task ends at its next
#: await; one that does not is left behind with a warning rather than holding the stop up).
STOP_TIMEOUT_S = 5.0


def to_stop(
    tasks: Iterable[asyncio.Task[Any]], stopping: asyncio.Task[Any] | None
) -> list[asyncio.Task[Any]]:
    """The tasks a stop cancels: every unfinished one but ``stopping``, the task doing the stopping.

    Example:
        >>> to_stop([fatal_drain, rescore], stopping=fatal_drain)
        [rescore]
    """
    return [task for task in tasks if task is not stopping and not task.done()]


def report(task: asyncio.Task[Any], what: str) -> None:
    """Log how a task that should have ended did: failed (an error), still running (a warning), or
    cancelled or returned (nothing)."""
    if not task.done():
        log.warning("%s did not stop within %gs; left behind", what, STOP_TIMEOUT_S)
    elif not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s failed: %s", what, error, exc_info=error)


async def stop(task: asyncio.Task[Any] | None, what: str) -> None:
    """Cancel ``task`` and wait until it ended; how it ended is reported, not raised (the caller is
    stopping). Never the running task itself; a cancel of the caller goes on up."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    await asyncio.wait([task])
    report(task, what)


class Background:
    """The worker's background tasks by name (at most one per name is kept: a finished one is
    replaced, so the set stays as small as the names)."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background as ``fabric-{name}``; a failure is logged when it ends."""
        task = asyncio.create_task(coro, name=f"fabric-{name}")
        task.add_done_callback(lambda done: report(done, f"background task {name}"))
        self._tasks[name] = task
        return task

    async def stop(self, name: str) -> None:
        """Cancel the task ``name`` (unless it is the one calling this) and wait until it ended."""
        task = self._tasks.get(name)
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        await asyncio.wait([task])

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def stop_all(self) -> None:
        """Cancel every background task but the one calling this, and wait (bounded) until they end."""
        tasks = to_stop(self._tasks.values(), asyncio.current_task())
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for task in pending:
                report(task, f"background task {task.get_name()}")
