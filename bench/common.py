"""What the baseline and the fabric scenarios share: subprocesses, readiness, names and statistics."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The broker every part of the bench talks to (the same variable fabric reads).
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: Project root: subprocesses run from here so ``workers.demo`` and ``bench`` import.
ROOT = Path(__file__).resolve().parent.parent


def amqp_url() -> str:
    return os.environ.get("FABRIC_AMQP_URL") or DEFAULT_AMQP_URL


def unique_namespace(kind: str) -> str:
    """A namespace no other run or test uses: ``bench-<kind>-<pid>-<random>`` (valid for fabric)."""
    return f"bench-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class BenchFailure(Exception):
    """A correctness check failed, or a process the bench needs died: the run exits non-zero."""


# -- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over the rounds."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(values), min(values), max(values), len(values))


# -- CPU accounting -------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far, from ``/proc`` (Linux);
    NaN where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def broker_pid() -> int | None:
    """The pid of the RabbitMQ node (``beam.smp``) running on this machine, so the bench can count
    the broker's CPU too; None when there is none we can see, or several (which one serves us?)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"beam.smp" in cmdline and b"rabbit" in cmdline:
                    found.append(int(entry.name))
    return found[0] if len(found) == 1 else None


class CpuMeter:
    """CPU milliseconds per task of named processes over one measured stretch.

    Example:
        >>> meter = CpuMeter({"driver": os.getpid()})
        >>> meter.start()
        >>> per_task = meter.stop(tasks=1000)  # {"driver": 0.41, ...}
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self, tasks: int) -> dict[str, float]:
        return {
            name: (cpu_seconds(pid) - self._before[name]) * 1000.0 / tasks for name, pid in self.pids.items()
        }


# -- subprocesses ---------------------------------------------------------------------------------

_LIVE: set[Proc] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


atexit.register(_kill_leftovers)


class Proc:
    """A child process in its own session (a Ctrl-C on the terminal reaches only the bench, which then
    stops its children in order); stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, args: Sequence[str], *, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def require_alive(self) -> None:
        if not self.alive():
            raise BenchFailure(
                f"{self.name} (pid {self.pid}) exited with code {self.popen.returncode}:\n{self.tail()}"
            )

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        self._close()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    async def astop(self, timeout_s: float = 15.0) -> None:
        await asyncio.to_thread(self.stop, timeout_s)

    def _close(self) -> None:
        _LIVE.discard(self)
        with contextlib.suppress(Exception):
            self._log.close()


def python_command(*args: str) -> list[str]:
    """``python <args>`` with the interpreter running the bench (a real binary, not a shim, so py-spy
    can attach to it)."""
    return [sys.executable, *args]


async def run_all(coros: Sequence[Awaitable[None]], *, timeout_s: float, what: str) -> None:
    """Run ``coros`` concurrently; on the first failure (or the deadline) cancel the rest and raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if pending:
            raise BenchFailure(f"{what}: {len(pending)} of {len(tasks)} did not finish within {timeout_s:g}s")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise BenchFailure(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)
