"""The router's background loops: one small helper runs each of them.

A :class:`Periodic` runs one step every ``interval_s`` in a named asyncio task. With an ``active``
check it runs the step only while the router is the active one (one meaning of "active" for every
loop: the router's claim to be the one consuming the events queue), and ``standby`` instead
otherwise. A step that raises is logged (at ``level``, with the loop's name) and the loop goes on:
a failed pass is tried again at the next interval. :meth:`Periodic.stop` ends the loop at once,
between two steps or by cancelling the step running, and waits until it ended.

Example:
    >>> recovery = Periodic("periodic recovery", recover, 15.0, active=is_active)
    >>> recovery.start()
    >>> await recovery.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("fabric.router")

#: One pass of a loop (or what a standby does instead).
Step = Callable[[], Awaitable[object]]


class Periodic:
    """Run ``step`` every ``interval_s`` (after the first interval, or at once with ``at_once``).

    ``active``: asked before each pass; when it answers False, ``standby`` runs instead of ``step``
    (nothing when None). Without it the step always runs (a loop every router runs, standby or not).
    ``level``: how a failed pass is logged.
    """

    def __init__(
        self,
        name: str,
        step: Step,
        interval_s: float,
        *,
        active: Callable[[], Awaitable[bool]] | None = None,
        standby: Step | None = None,
        at_once: bool = False,
        level: int = logging.ERROR,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"{name}: interval_s must be > 0, not {interval_s!r}")
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._active = active
        self._standby = standby
        self._at_once = at_once
        self._level = level
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Passes run (step or standby), failed ones included.
        self.passes = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop in a task named ``fabric-router {name}``; a second start is refused."""
        if self._task is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._task = asyncio.create_task(self._run(), name=f"fabric-router {self.name}")

    async def stop(self) -> None:
        """End the loop and wait until it ended (a loop never started, or stopped, is left alone).
        The caller being cancelled meanwhile is not swallowed."""
        self._stopping.set()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        task.cancel()
        await asyncio.wait([task])

    async def run_once(self) -> None:
        """One pass, as the loop runs it: the step, or the standby's, guarded and logged."""
        self.passes += 1
        try:
            if self._active is None or await self._active():
                await self._step()
            elif self._standby is not None:
                await self._standby()
        except Exception as exc:
            log.log(self._level, "%s failed (will try again): %s", self.name, exc)

    async def _run(self) -> None:
        if self._at_once:
            await self.run_once()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return
            await self.run_once()
