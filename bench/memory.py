"""S5 memory (issue 6): the RSS of the router and the workers while many tasks complete, and of the
router while a large backlog waits in the broker with no worker running.

* **completing**: one fleet (router + workers), workflows of ``per_workflow`` independent
  ``demo.echo`` tasks run through :class:`fabric.FabricClient` with ``window`` workflows in flight, until
  ``total`` tasks have completed; the RSS of every fabric process is read from ``/proc`` each time
  another ``sample_every`` tasks have completed. Each result is checked. The target: the router's RSS
  at ``total`` within 10 % of its RSS at the first sample (50,000 of 500,000 in the full run); the
  workers are reported the same way.
* **queued**: a router with no worker; ``queued`` tasks submitted as workflows of ``queued_batch``
  independent tasks until every one is accepted (stored, published, confirmed). Then the capability
  queue must hold all of them (the backlog lives in the broker) and the router's RSS must stay under
  150 MB.

Linux only (``/proc/<pid>/status``). Long in its full form: ``make bench-memory``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BenchFailure, eventually
from bench.scenarios import CAPABILITY, Fleet, _expect_succeeded
from fabric.topology import names

#: The router's RSS with the backlog queued must stay under this (issue 6).
QUEUED_RSS_LIMIT_MB = 150.0
#: RSS at the last sample over RSS at the first sample, at most (issue 6).
GROWTH_LIMIT = 1.10


@dataclass(frozen=True)
class MemorySizes:
    total: int  # tasks completed in all
    sample_every: int  # tasks between two RSS samples (the first sample is the reference)
    per_workflow: int  # independent tasks per workflow
    window: int  # workflows in flight
    queued: int  # tasks left queued with no worker
    queued_batch: int  # tasks per workflow of the backlog
    workers: int = 2
    concurrency: int = 32


#: Workflows of 50 independent tasks (10,000 of them in all): per-workflow state is exercised 10,000
#: times, and the run fits in well under an hour on a shared 2-core machine (one-task workflows would
#: take several).
FULL_MEMORY = MemorySizes(
    total=500_000, sample_every=50_000, per_workflow=50, window=12, queued=100_000, queued_batch=1_000
)
QUICK_MEMORY = MemorySizes(
    total=2_000, sample_every=500, per_workflow=10, window=16, queued=2_000, queued_batch=500
)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB (MiB) from ``/proc/<pid>/status``: resident now, and at its peak."""
    rss = hwm = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


@dataclass
class Sample:
    completed: int
    elapsed_s: float
    rss_mb: dict[str, float]


@dataclass
class CompletingResult:
    sizes: MemorySizes
    samples: list[Sample] = field(default_factory=list)
    idle_mb: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def growth(self, process: str) -> float:
        """RSS at the last sample over RSS at the first (the reference)."""
        if len(self.samples) < 2:
            return float("nan")
        return self.samples[-1].rss_mb[process] / self.samples[0].rss_mb[process]


@dataclass
class QueuedResult:
    queued: int
    in_broker: int
    router_rss_mb: float
    router_peak_mb: float
    router_idle_mb: float
    elapsed_s: float


def _echo_batch(first: int, count: int) -> dict[str, Any]:
    return {"tasks": [{"id": f"t{i}", "capability": CAPABILITY, "input": first + i} for i in range(count)]}


def _processes(fleet: Fleet) -> dict[str, int]:
    assert fleet.router is not None
    procs = {"router": fleet.router.pid}
    procs.update({f"worker{i + 1}": p.pid for i, p in enumerate(fleet.worker_procs)})
    return procs


def _rss_now(procs: dict[str, int]) -> dict[str, float]:
    return {name: rss_mb(pid)[0] for name, pid in procs.items()}


async def s5_completing(fleet: Fleet, sizes: MemorySizes, *, say: Any = print) -> CompletingResult:
    """Run ``sizes.total`` tasks to completion, sampling the RSS of every fabric process on the way."""
    client = fleet.client
    procs = _processes(fleet)
    result = CompletingResult(sizes, idle_mb=_rss_now(procs))
    workflows = -(-sizes.total // sizes.per_workflow)
    next_index = 0
    completed = 0
    next_sample = sizes.sample_every
    started = time.perf_counter()
    timeout_s = 120.0

    def sample() -> None:
        nonlocal next_sample
        fleet.check_alive()
        point = Sample(completed, time.perf_counter() - started, _rss_now(procs))
        result.samples.append(point)
        rates = completed / point.elapsed_s if point.elapsed_s else 0.0
        figures = ", ".join(f"{name} {mb:.1f} MB" for name, mb in point.rss_mb.items())
        say(f"    {completed:>9,} tasks completed ({rates:,.0f}/s): {figures}")
        while next_sample <= completed:
            next_sample += sizes.sample_every

    async def lane() -> None:
        nonlocal next_index, completed
        while next_index < workflows:
            index = next_index
            next_index += 1
            count = min(sizes.per_workflow, sizes.total - index * sizes.per_workflow)
            first = index * sizes.per_workflow
            done = await client.run(_echo_batch(first, count), timeout_s=timeout_s)
            _expect_succeeded(done, "S5")
            for i in range(count):
                if done.tasks[f"t{i}"].result != first + i:
                    raise BenchFailure(
                        f"S5: task t{i} of {done.workflow_id} returned {done.tasks[f't{i}'].result!r}"
                    )
            completed += count
            if completed >= next_sample:
                sample()

    lanes = [asyncio.ensure_future(lane()) for _ in range(min(sizes.window, workflows))]
    try:
        done, _ = await asyncio.wait(lanes, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
    result.elapsed_s = time.perf_counter() - started
    if completed != sizes.total:
        raise BenchFailure(f"S5: {completed} tasks completed, expected {sizes.total}")
    if not result.samples or result.samples[-1].completed != completed:
        sample()
    return result


async def s5_queued(fleet: Fleet, sizes: MemorySizes, *, say: Any = print) -> QueuedResult:
    """Queue ``sizes.queued`` tasks with no worker running; check the broker holds them all."""
    assert fleet.router is not None
    assert not fleet.worker_procs
    pid = fleet.router.pid
    idle, _ = rss_mb(pid)
    started = time.perf_counter()
    submitted = 0
    while submitted < sizes.queued:
        count = min(sizes.queued_batch, sizes.queued - submitted)
        accepted = await fleet.client.submit(_echo_batch(submitted, count))
        if accepted.tasks != count:
            raise BenchFailure(f"S5 queued: accepted {accepted.tasks} tasks, expected {count}")
        submitted += count
        if submitted % max(sizes.queued // 5, 1) < count:
            say(f"    {submitted:>9,} tasks queued: router {rss_mb(pid)[0]:.1f} MB")
    elapsed = time.perf_counter() - started
    queue = names.capability_queue(fleet.ns, CAPABILITY)
    depth = 0

    async def all_in_broker() -> bool:
        nonlocal depth
        fleet.check_alive()
        info = await fleet.broker.queue_info(queue)
        depth = info.messages if info is not None else 0
        return depth >= sizes.queued

    try:
        await eventually(all_in_broker, timeout_s=60, what=f"{sizes.queued} messages in {queue}")
    except BenchFailure as exc:
        raise BenchFailure(f"S5 queued: {queue} holds {depth} messages, expected {sizes.queued}") from exc
    rss, hwm = rss_mb(pid)
    return QueuedResult(sizes.queued, depth, rss, hwm, idle, elapsed)
