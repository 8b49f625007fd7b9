"""The fabric scenarios of issue 6, through the public API against real processes.

A :class:`Fleet` starts a router and N workers (``workers.demo:agent``) as subprocesses through the CLI,
in a namespace of its own, with the defaults a user gets: publisher confirms everywhere, persistent
messages, the SQLite store with durable commits (``synchronous=FULL``). The scenarios then talk to it
through :class:`fabric.FabricClient` only.

* S1 throughput: N independent one-task workflows of ``demo.echo``, ``window`` in flight.
* S2 wide DAG: one workflow root -> W-2 parallel -> join (``demo.sum`` of every parallel result).
* S3 latency: sequential submit -> completed round trips of one task; p50 and p99.
* S4 admission: :func:`fabric.router.admission.admit` on the encoded body of a random DAG (pure CPU),
  and submit -> accepted through a router with no workers.
* S5 memory: in :mod:`bench.memory` (long; ``make bench-memory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import time
from pathlib import Path
from typing import Any, Self

import msgpack

from bench.common import (
    BenchFailure,
    Proc,
    eventually,
    percentile,
    python_command,
    run_all,
    unique_namespace,
)
from fabric import Completed, FabricClient, load_settings
from fabric.router.admission import admit
from fabric.topology import spec
from fabric.transport.amqp import AmqpConnection
from workers.demo import agent as demo_agent

CAPABILITY = "demo.echo"
JOIN_CAPABILITY = "demo.sum"


class Fleet:
    """A router and ``workers`` demo workers in a fresh namespace, plus a client talking to them.

    Everything is undone on exit, whatever happened: processes stopped, queues and exchanges deleted.
    """

    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        kind: str,
        workers: int = 2,
        concurrency: int = 32,
        reply_timeout_s: float = 120.0,
    ) -> None:
        self.url = url
        self.ns = unique_namespace(kind)
        self.workdir = workdir
        self.workers = workers
        self.concurrency = concurrency
        self.reply_timeout_s = reply_timeout_s
        self.router: Proc | None = None
        self.worker_procs: list[Proc] = []
        self._broker = AmqpConnection(url, name=f"bench-probe:{self.ns}")
        self._client: FabricClient | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def client(self) -> FabricClient:
        assert self._client is not None, "the fleet is not started"
        return self._client

    @property
    def broker(self) -> AmqpConnection:
        """The fleet's own broker connection (queue depths, consumer counts)."""
        return self._broker

    @property
    def router_pid(self) -> int:
        assert self.router is not None, "the fleet is not started"
        return self.router.pid

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.worker_procs]

    @property
    def processes(self) -> list[Proc]:
        return [p for p in (self.router, *self.worker_procs) if p is not None]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FABRIC_AMQP_URL": self.url,
                "FABRIC_NAMESPACE": self.ns,
                "FABRIC_STORE__URL": f"sqlite:///{self.workdir / (self.ns + '.db')}",
                "FABRIC_HTTP__PORT": "0",
                "FABRIC_LOG_LEVEL": "WARNING",
            }
        )
        return env

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        await self._broker.connect()
        env = self.env()
        self.router = Proc(
            f"router[{self.ns}]",
            python_command("-m", "fabric.cli", "router"),
            env=env,
            log_path=self.workdir / f"{self.ns}-router.log",
        )
        await self._consumers(f"{self.ns}.router.submit", 1, [self.router])
        for i in range(self.workers):
            self.worker_procs.append(
                Proc(
                    f"worker{i + 1}[{self.ns}]",
                    python_command(
                        "-m",
                        "fabric.cli",
                        "worker",
                        "workers.demo:agent",
                        "--concurrency",
                        str(self.concurrency),
                    ),
                    env=env,
                    log_path=self.workdir / f"{self.ns}-worker{i + 1}.log",
                )
            )
        if self.workers:
            await self._consumers(f"{self.ns}.cap.{CAPABILITY}", self.workers, self.worker_procs)
        settings = load_settings(namespace=self.ns, amqp_url=self.url)
        self._client = await self._stack.enter_async_context(
            FabricClient(settings, reply_timeout_s=self.reply_timeout_s)
        )

    async def _consumers(self, queue: str, count: int, procs: list[Proc]) -> None:
        async def ready() -> bool:
            for proc in procs:
                proc.require_alive()
            info = await self._broker.queue_info(queue)
            return info is not None and info.consumers >= count

        await eventually(ready, timeout_s=60, what=f"{count} consumer(s) on {queue}")

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.require_alive()

    async def close(self) -> None:
        """Close the client, stop the workers then the router, delete the namespace's topology."""
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        await asyncio.gather(*(p.astop() for p in self.worker_procs))
        if self.router is not None:
            await self.router.astop()
        with contextlib.suppress(Exception):
            if self._broker.connected:
                await self._broker.delete(spec.build(self.ns, demo_agent.capabilities))
        with contextlib.suppress(Exception):
            await self._broker.close()


# -- workflows ------------------------------------------------------------------------------------


def _expect_succeeded(done: Completed, what: str) -> None:
    if done.status != "succeeded":
        failed = {k: (t.status, t.error) for k, t in done.tasks.items() if t.status != "succeeded"}
        sample = dict(list(failed.items())[:3])
        raise BenchFailure(f"{what}: workflow {done.workflow_id} ended {done.status}: {sample}")


def echo_workflow(value: Any) -> dict[str, Any]:
    return {"tasks": [{"id": "a", "capability": CAPABILITY, "input": value}]}


def wide_workflow(width: int) -> dict[str, Any]:
    """root -> ``width - 2`` parallel echo tasks -> join summing their results (``width`` tasks)."""
    middle = [f"m{i}" for i in range(1, width - 1)]
    tasks: list[dict[str, Any]] = [{"id": "root", "capability": CAPABILITY, "input": 0}]
    tasks += [
        {"id": tid, "capability": CAPABILITY, "input": i, "depends_on": ["root"]}
        for i, tid in enumerate(middle, start=1)
    ]
    tasks.append({"id": "join", "capability": JOIN_CAPABILITY, "input": 0, "depends_on": middle})
    return {"tasks": tasks}


def random_dag(n: int, seed: int, *, workflow_id: str | None = None) -> dict[str, Any]:
    """``n`` tasks; each depends on 0-3 random earlier tasks (about 5 % are roots)."""
    rng = random.Random(seed)
    tasks: list[dict[str, Any]] = []
    for i in range(n):
        task: dict[str, Any] = {"id": f"t{i}", "capability": CAPABILITY, "input": i}
        if i > 0 and rng.random() >= 0.05:
            k = min(i, rng.randint(1, 3))
            task["depends_on"] = [f"t{j}" for j in rng.sample(range(max(0, i - 1000), i), k)]
        tasks.append(task)
    workflow: dict[str, Any] = {"tasks": tasks}
    if workflow_id:
        workflow["workflow_id"] = workflow_id
    return workflow


# -- scenarios ------------------------------------------------------------------------------------


async def s1_throughput(client: FabricClient, n: int, *, window: int = 256) -> dict[str, Any]:
    """``n`` independent one-task workflows, ``window`` in flight; first submit to last completed."""
    semaphore = asyncio.Semaphore(window)
    timeout_s = max(120.0, n / 10)

    async def one(i: int) -> None:
        async with semaphore:
            done = await client.run(echo_workflow(i), timeout_s=timeout_s)
        _expect_succeeded(done, "S1")
        result = done.tasks["a"].result
        if result != i:
            raise BenchFailure(f"S1: workflow {done.workflow_id} returned {result!r}, expected {i}")

    started = time.perf_counter()
    await run_all([one(i) for i in range(n)], timeout_s=timeout_s, what="S1 workflows")
    elapsed = time.perf_counter() - started
    return {"n": n, "elapsed_s": elapsed, "tasks_per_s": n / elapsed}


async def s2_wide(client: FabricClient, width: int) -> dict[str, Any]:
    """One workflow of ``width`` tasks (root -> parallel -> join), submit to completed."""
    timeout_s = max(120.0, width / 5)
    started = time.perf_counter()
    done = await client.run(wide_workflow(width), timeout_s=timeout_s)
    elapsed = time.perf_counter() - started
    _expect_succeeded(done, "S2")
    if len(done.tasks) != width:
        raise BenchFailure(f"S2: {len(done.tasks)} task outcomes, expected {width}")
    for i in range(1, width - 1):
        if done.tasks[f"m{i}"].result != i:
            raise BenchFailure(f"S2: task m{i} returned {done.tasks[f'm{i}'].result!r}, expected {i}")
    expected = sum(range(1, width - 1))
    if done.tasks["join"].result != expected:
        raise BenchFailure(f"S2: join returned {done.tasks['join'].result!r}, expected {expected}")
    return {"n": width, "elapsed_s": elapsed, "tasks_per_s": width / elapsed}


async def s3_latency(client: FabricClient, n: int) -> dict[str, Any]:
    """``n`` sequential submit -> completed round trips of one task; p50 and p99 in milliseconds."""
    samples: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        done = await client.run(echo_workflow({"seq": i}), timeout_s=30)
        samples.append((time.perf_counter() - started) * 1000.0)
        _expect_succeeded(done, "S3")
        if done.tasks["a"].result != {"seq": i}:
            raise BenchFailure(f"S3: round trip {i} returned {done.tasks['a'].result!r}")
    return {"n": n, "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)}


def s4_admit(n: int, seed: int) -> dict[str, Any]:
    """Validate and admit an encoded random DAG of ``n`` tasks with the router's own function (pure CPU)."""
    workflow = random_dag(n, seed)
    body = msgpack.packb(workflow, use_bin_type=True)
    roots = sum(1 for t in workflow["tasks"] if not t.get("depends_on"))
    gc.collect()
    started = time.perf_counter()
    admitted = admit(
        body,
        "application/msgpack",
        message_id=f"bench-admit-{n}-{seed}",
        reply_to=None,
        correlation_id=None,
        max_body_bytes=1 << 30,
        max_tasks=max(n, 1),
        default_max_attempts=3,
    )
    elapsed = time.perf_counter() - started
    if len(admitted.tasks) != n or len(admitted.ready) != roots:
        raise BenchFailure(
            f"S4: admitted {len(admitted.tasks)} tasks ({len(admitted.ready)} ready), "
            f"expected {n} ({roots} ready)"
        )
    return {"n": n, "seconds": elapsed, "bytes": len(body), "roots": roots}


async def s4_end_to_end(client: FabricClient, n: int, seed: int, workflow_id: str) -> dict[str, Any]:
    """Submit a random DAG of ``n`` tasks to a router with no workers; time until ``accepted``."""
    workflow = random_dag(n, seed, workflow_id=workflow_id)
    started = time.perf_counter()
    accepted = await client.submit(workflow)
    elapsed = time.perf_counter() - started
    if accepted.tasks != n or accepted.workflow_id != workflow_id:
        raise BenchFailure(f"S4 end to end: accepted {accepted!r}, expected {n} tasks of {workflow_id}")
    return {"n": n, "seconds": elapsed}
