"""Profile running processes with py-spy and summarise where they spend their time.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;frame count``); this module
turns them into "self" (the frame on top of the stack) and "inclusive" (anywhere on the stack) shares
per function, which is what a reader needs to pick what to speed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: ``name (path/to/file.py:123)`` -> name, file, line.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy")


class Recorder:
    """``py-spy record`` attached to ``pid`` until :meth:`stop` (SIGINT makes py-spy write its file)."""

    def __init__(self, pid: int, output: Path, *, rate: int = 100) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.output = output
        self._log = output.with_suffix(".log").open("wb")
        self.popen = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--function",
                "--threads",
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.popen.wait, 30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        with contextlib.suppress(Exception):
            self._log.close()


@dataclass(frozen=True)
class Hotspots:
    samples: int
    self_time: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]
    threads: list[tuple[str, int]]

    def render(self, title: str, top: int = 15) -> str:
        if not self.samples:
            return f"{title}: no samples\n"
        idle = sum(c for n, c in self.self_time if n.startswith("EpollSelector.select"))
        lines = [
            f"{title}: {self.samples} samples at 100 Hz, all threads "
            f"({100 * idle / self.samples:.0f}% of them waiting in epoll)"
        ]
        lines.append("  threads:")
        lines += [f"    {100 * c / self.samples:5.1f}%  {name}" for name, c in self.threads[:top]]
        lines.append("  self (top of stack):")
        lines += [f"    {100 * c / self.samples:5.1f}%  {name}" for name, c in self.self_time[:top]]
        lines.append("  inclusive (anywhere on the stack), fabric code only:")
        fabric = [
            (n, c)
            for n, c in self.inclusive
            if ("fabric/" in n or "workers/" in n) and "fabric/cli/" not in n
        ]
        lines += [f"    {100 * c / self.samples:5.1f}%  {name}" for name, c in fabric[:top]]
        return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{match['name']} ({path})"


def summarise(raw: Path) -> Hotspots:
    """Read py-spy's collapsed stacks (``--threads`` puts the thread first) into hot-spot tables."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return Hotspots(0, [], [], [])
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
        if thread:
            frames = frames[1:]
        threads[_thread_label(thread, frames)] += count
        names = [_short(f) for f in frames]
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
        total += count
    return Hotspots(total, self_time.most_common(), inclusive.most_common(), threads.most_common())


def _thread_label(thread: str, frames: list[str]) -> str:
    """``thread (123): MainThread`` -> a readable role (the store's thread is named fabric-sqlite)."""
    name = thread.split("): ", 1)[-1] if "): " in thread else thread
    if name.startswith("fabric-sqlite"):
        return "fabric-sqlite thread (SQLite calls)"
    if name == "MainThread":
        return "MainThread (event loop)"
    return name or "other"
