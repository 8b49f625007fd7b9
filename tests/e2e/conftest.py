"""Router and workers as real subprocesses through the `fabric` CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.settings import FabricSettings
from fabric.transport.amqp import AmqpConnection
from tests.conftest import eventually, subprocess_env

pytestmark = [pytest.mark.rabbitmq, pytest.mark.e2e]


def fabric_command() -> list[str]:
    """The installed `fabric` console script (falls back to `python -m fabric.cli`)."""
    found = shutil.which("fabric", path=str(Path(sys.executable).parent)) or shutil.which("fabric")
    return [found] if found else [sys.executable, "-m", "fabric.cli"]


class Proc:
    """A fabric subprocess whose output goes to a log file under the test's tmp_path."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [*fabric_command(), *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


class Fleet:
    """Starts router and worker subprocesses for one test and stops them all afterwards."""

    def __init__(self, settings: FabricSettings, broker: AmqpConnection, logs: Path) -> None:
        self.settings = settings
        self.broker = broker
        self.logs = logs
        self.procs: list[Proc] = []
        self.env = subprocess_env(settings)

    def spawn(self, name: str, *args: str, **env: str) -> Proc:
        proc = Proc(name, list(args), {**self.env, **env}, self.logs)
        self.procs.append(proc)
        return proc

    async def router(self, name: str = "router") -> Proc:
        proc = self.spawn(name, "router")
        await self._consumed(f"{self.settings.namespace}.router.submit", proc)
        return proc

    async def worker(
        self, name: str, target: str = "workers.demo:agent", *, concurrency: int = 4, queue: str = "demo.echo"
    ) -> Proc:
        queue_name = f"{self.settings.namespace}.cap.{queue}"
        before = await self.broker.queue_info(queue_name)
        proc = self.spawn(
            name, "worker", target, "--concurrency", str(concurrency), FABRIC_WORKER__AGENT_ID=name
        )
        await self._consumed(queue_name, proc, more_than=before.consumers if before else 0)
        return proc

    async def _consumed(self, queue: str, proc: Proc, more_than: int = 0) -> None:
        async def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early:\n{proc.log()}")
            info = await self.broker.queue_info(queue)
            return info is not None and info.consumers > more_than

        await eventually(ready, timeout=60, interval=0.1, what=f"{proc.name} consuming {queue}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def fleet(settings: FabricSettings, broker: AmqpConnection, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(settings, broker, tmp_path)
    yield fleet
    fleet.stop_all()


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a short fabric CLI command to completion."""
    return subprocess.run(
        [*fabric_command(), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


__all__ = ["Fleet", "Proc", "os", "run_cli"]
