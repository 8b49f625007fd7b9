"""`make bench`: the raw baseline and the fabric scenarios, several rounds, in one run (issue 6).

    python -m bench.run                 # 3 rounds, default sizes (~10 minutes on 2 cores at most)
    python -m bench.run --quick         # 1 round, tiny sizes: a CI smoke run, correctness only
    python -m bench.run --full          # the issue's sizes (S1 20,000 workflows, S3 500 round trips)
    python -m bench.run --profile DIR   # plus one extra S1 pass under py-spy (router and workers)
    python -m bench.run --scenario s5   # S5 memory alone: 500,000 tasks completed, 100,000 queued (long)
    python -m bench.run --scenario s5 --quick   # S5 with small counts: a CI smoke run

S5 is a target of its own (``make bench-memory``): it writes its section of bench/RESULTS.md and a
default run keeps that section as it is.

Every figure is a median over the rounds with its spread (min-max); every target is a ratio against
the baseline measured in this same run. Prints the table and writes it, with versions and machine
facts, to bench/RESULTS.md (a --quick run writes elsewhere unless --output says so).
Exit status: 0 when every correctness check passed (targets missed are reported, not failed),
1 when a check failed or a process died, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import msgpack

import fabric
from bench import hotspots
from bench.baseline import PREFETCH, Baseline
from bench.common import ROOT, BenchFailure, CpuMeter, Summary, amqp_url, broker_pid
from bench.memory import (
    FULL_MEMORY,
    GROWTH_LIMIT,
    QUEUED_RSS_LIMIT_MB,
    QUICK_MEMORY,
    CompletingResult,
    MemorySizes,
    QueuedResult,
    s5_completing,
    s5_queued,
)
from bench.scenarios import Fleet, s1_throughput, s2_wide, s3_latency, s4_admit, s4_end_to_end

RESULTS = ROOT / "bench" / "RESULTS.md"
#: The S5 section of RESULTS.md lies between these lines; each kind of run rewrites only its own part.
S5_BEGIN = "<!-- S5 memory: written by `python -m bench.run --scenario s5` -->"
S5_END = "<!-- end of S5 -->"


@dataclass(frozen=True)
class Sizes:
    throughput: int  # baseline round trips and S1 workflows (the same N, so the ratio is fair)
    wide: int  # S2 tasks
    latency: int  # baseline and S3 sequential round trips
    admit_small: int  # S4
    admit_large: int  # S4 growth
    admit_e2e: int  # S4 through the router
    warmup: int
    window: int = 256  # in-flight tasks of the baseline producer and the S1 client
    workers: int = 2
    concurrency: int = 32  # per fabric worker; the baseline worker's prefetch is 32 too


DEFAULT = Sizes(
    throughput=5_000,
    wide=1_000,
    latency=300,
    admit_small=10_000,
    admit_large=100_000,
    admit_e2e=10_000,
    warmup=300,
)
FULL = Sizes(
    throughput=20_000,
    wide=1_000,
    latency=500,
    admit_small=10_000,
    admit_large=100_000,
    admit_e2e=10_000,
    warmup=500,
)
QUICK = Sizes(
    throughput=100, wide=50, latency=20, admit_small=1_000, admit_large=10_000, admit_e2e=1_000, warmup=20
)


# -- the run --------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


async def measure(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """Run every round; return the per-round figures and, with --profile, the hot spots."""
    url = amqp_url()
    figures: dict[str, list[float]] = {}
    profile: dict[str, str] = {}

    def note(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)

    async with contextlib.AsyncExitStack() as stack:
        _say("starting: baseline worker, fabric router + 2 workers, fabric router alone (S4)")
        baseline = await stack.enter_async_context(Baseline(url, workdir, window=sizes.window))
        fleet = await stack.enter_async_context(
            Fleet(url, workdir, kind="s", workers=sizes.workers, concurrency=sizes.concurrency)
        )
        lone = await stack.enter_async_context(Fleet(url, workdir, kind="s4", workers=0))
        # CPU per task of every process taking part (the broker too, when it runs on this machine):
        # shows where a scenario's time goes, and what 2 cores allow at most.
        broker = broker_pid()
        shared = {"bench process": os.getpid(), **({"broker": broker} if broker else {})}
        base_cpu = CpuMeter({**shared, "baseline worker": baseline.worker_pid})
        fleet_cpu = CpuMeter(
            {
                **shared,
                "router": fleet.router_pid,
                **{f"worker{i + 1}": pid for i, pid in enumerate(fleet.worker_pids)},
            }
        )

        def note_cpu(scenario: str, meter: CpuMeter, tasks: int) -> None:
            for name, ms in meter.stop(tasks).items():
                note(f"cpu_{scenario}[{name}]", ms)

        _say(f"warm-up: {sizes.warmup} round trips each")
        await baseline.throughput(sizes.warmup)
        await s1_throughput(fleet.client, sizes.warmup, window=sizes.window)
        await s3_latency(fleet.client, min(sizes.warmup, 20))
        s4_admit(min(sizes.admit_small, 1000), seed=0)
        await s4_end_to_end(
            lone.client, min(sizes.admit_e2e, 1000), seed=0, workflow_id=f"s4-0-{os.getpid()}"
        )

        for r in range(1, args.rounds + 1):
            _say(f"round {r}/{args.rounds}")
            base_cpu.start()
            b = await baseline.throughput(sizes.throughput)
            note_cpu("base", base_cpu, sizes.throughput)
            note("base_tps", b["tasks_per_s"])
            _say(f"  baseline throughput  {b['tasks_per_s']:8.0f} tasks/s  ({b['elapsed_s']:.2f} s)")
            fleet_cpu.start()
            s1 = await s1_throughput(fleet.client, sizes.throughput, window=sizes.window)
            note_cpu("s1", fleet_cpu, sizes.throughput)
            fleet.check_alive()
            note("s1_tps", s1["tasks_per_s"])
            _say(f"  S1 throughput        {s1['tasks_per_s']:8.0f} tasks/s  ({s1['elapsed_s']:.2f} s)")
            fleet_cpu.start()
            s2 = await s2_wide(fleet.client, sizes.wide)
            note_cpu("s2", fleet_cpu, sizes.wide)
            fleet.check_alive()
            note("s2_tps", s2["tasks_per_s"])
            _say(f"  S2 wide DAG          {s2['tasks_per_s']:8.0f} tasks/s  ({s2['elapsed_s']:.2f} s)")
            bl = await baseline.latency(sizes.latency)
            note("base_p50", bl["p50_ms"])
            note("base_p99", bl["p99_ms"])
            _say(f"  baseline latency     p50 {bl['p50_ms']:7.2f} ms  p99 {bl['p99_ms']:7.2f} ms")
            s3 = await s3_latency(fleet.client, sizes.latency)
            fleet.check_alive()
            note("s3_p50", s3["p50_ms"])
            note("s3_p99", s3["p99_ms"])
            _say(f"  S3 latency           p50 {s3['p50_ms']:7.2f} ms  p99 {s3['p99_ms']:7.2f} ms")
            small = s4_admit(sizes.admit_small, seed=r)
            large = s4_admit(sizes.admit_large, seed=r)
            note("s4_small", small["seconds"])
            note("s4_large", large["seconds"])
            _say(
                f"  S4 admit()           {sizes.admit_small:,} tasks {small['seconds']:.3f} s, "
                f"{sizes.admit_large:,} tasks {large['seconds']:.3f} s"
            )
            e2e = await s4_end_to_end(
                lone.client, sizes.admit_e2e, seed=r, workflow_id=f"s4-{r}-{os.getpid()}"
            )
            lone.check_alive()
            note("s4_e2e", e2e["seconds"])
            _say(f"  S4 submit->accepted  {sizes.admit_e2e:,} tasks {e2e['seconds']:.3f} s")

        if args.profile:
            profile = await _profile(args.profile, fleet, sizes)
    return {"figures": figures, "profile": profile}


async def _profile(directory: Path, fleet: Fleet, sizes: Sizes) -> dict[str, str]:
    """One extra S1 pass (not counted) with py-spy sampling the router and each worker."""
    if hotspots.py_spy() is None:
        _say("profile: py-spy is not installed (pip install py-spy); skipped")
        return {}
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    targets = {"router": fleet.router, **{f"worker{i + 1}": p for i, p in enumerate(fleet.worker_procs)}}
    recorders = {
        name: hotspots.Recorder(proc.pid, directory / f"{name}.txt")
        for name, proc in targets.items()
        if proc is not None
    }
    _say(f"profile: S1 with {sizes.throughput} workflows under py-spy ({', '.join(recorders)})")
    try:
        await asyncio.sleep(1.0)
        s1 = await s1_throughput(fleet.client, sizes.throughput, window=sizes.window)
        _say(f"  S1 under py-spy      {s1['tasks_per_s']:8.0f} tasks/s (not counted)")
    finally:
        for recorder in recorders.values():
            await recorder.stop()
    reports: dict[str, str] = {}
    for name, recorder in recorders.items():
        text = hotspots.summarise(recorder.output).render(f"{name} during S1")
        (directory / f"{name}-hotspots.txt").write_text(text)
        reports[name] = text
        _say(text)
    return reports


# -- S5 memory ------------------------------------------------------------------------------------


async def measure_memory(sizes: MemorySizes, workdir: Path) -> tuple[QueuedResult, CompletingResult]:
    """S5: the backlog with no worker first (its own router), then the long completing run."""
    url = amqp_url()
    _say(f"S5 queued: {sizes.queued:,} tasks to a router with no worker running")
    async with Fleet(url, workdir, kind="s5q", workers=0) as lone:
        queued = await s5_queued(lone, sizes, say=_say)
    _say(
        f"  router {queued.router_rss_mb:.1f} MB (peak {queued.router_peak_mb:.1f} MB) with "
        f"{queued.in_broker:,} tasks in the broker"
    )
    _say(
        f"S5 completing: {sizes.total:,} tasks in workflows of {sizes.per_workflow}, "
        f"{sizes.workers} workers, RSS every {sizes.sample_every:,}"
    )
    async with Fleet(url, workdir, kind="s5", workers=sizes.workers, concurrency=sizes.concurrency) as fleet:
        # Warm-up (imports, caches, the first pages of SQLite) before the idle reading.
        await s1_throughput(fleet.client, 50, window=16)
        completing = await s5_completing(fleet, sizes, say=_say)
    return queued, completing


def render_s5(queued: QueuedResult, completing: CompletingResult, *, judge: bool, header: str) -> str:
    sizes = completing.sizes
    first, last = completing.samples[0], completing.samples[-1]
    verdict_text = "not judged (--quick)"

    def verdict(ok: bool) -> str:
        return ("met" if ok else "**MISSED**") if judge else verdict_text

    lines = [
        S5_BEGIN,
        "## S5 memory",
        "",
        header,
        "",
        "| figure | value | target | verdict |",
        "|---|---:|---|---|",
    ]
    for name in last.rss_mb:
        growth = completing.growth(name)
        target = f"<= {GROWTH_LIMIT:.2f} x" if name == "router" else f"(<= {GROWTH_LIMIT:.2f} x)"
        lines.append(
            f"| {name} RSS at {first.completed:,} / {last.completed:,} tasks completed "
            f"| {first.rss_mb[name]:.1f} MB / {last.rss_mb[name]:.1f} MB = {growth:.3f} x "
            f"| {target} | {verdict(growth <= GROWTH_LIMIT)} |"
        )
    lines.append(
        f"| router RSS with {queued.queued:,} tasks queued, no worker (peak while admitting) "
        f"| {queued.router_rss_mb:.1f} MB ({queued.router_peak_mb:.1f} MB) "
        f"| < {QUEUED_RSS_LIMIT_MB:.0f} MB | {verdict(queued.router_rss_mb < QUEUED_RSS_LIMIT_MB)} |"
    )
    lines.append(
        f"| tasks in the broker's capability queue with no worker | {queued.in_broker:,} "
        f"| {queued.queued:,} (the backlog lives in the broker) | "
        f"{'met' if queued.in_broker >= queued.queued else '**MISSED**'} |"
    )
    lines += [
        "",
        f"Completing: {sizes.total:,} `demo.echo` tasks as {-(-sizes.total // sizes.per_workflow):,} "
        f"workflows of {sizes.per_workflow} independent tasks, {sizes.window} workflows in flight through "
        f"`FabricClient`, {sizes.workers} workers x concurrency {sizes.concurrency}, SQLite store with "
        f"durable commits; every result checked; {completing.elapsed_s:.0f} s "
        f"({sizes.total / completing.elapsed_s:,.0f} tasks/s). RSS (VmRSS, MB = MiB) read from /proc "
        f"every {sizes.sample_every:,} completed tasks; the reference is the first sample. Idle after "
        "a 50-workflow warm-up: " + ", ".join(f"{k} {v:.1f} MB" for k, v in completing.idle_mb.items()) + ".",
        f"Queued: {queued.queued:,} tasks submitted as workflows of {sizes.queued_batch:,} independent "
        f"tasks to a router with no worker, each accepted (stored, published, confirmed) in "
        f"{queued.elapsed_s:.1f} s; the router's RSS was {queued.router_idle_mb:.1f} MB before.",
        "",
        "| tasks completed | s | " + " | ".join(f"{k} MB" for k in last.rss_mb) + " |",
        "|---:|---:|" + "---:|" * len(last.rss_mb),
    ]
    for point in completing.samples:
        lines.append(
            f"| {point.completed:,} | {point.elapsed_s:.0f} | "
            + " | ".join(f"{v:.1f}" for v in point.rss_mb.values())
            + " |"
        )
    lines += ["", S5_END]
    return "\n".join(lines)


def main_memory(args: argparse.Namespace) -> int:
    sizes = QUICK_MEMORY if args.quick else FULL_MEMORY
    machine = facts()
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    _say(
        f"fabric bench S5 (memory): {'quick' if args.quick else 'full'} sizes, broker "
        f"{amqp_url().rsplit('@', 1)[-1]}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp:
            try:
                queued, completing = asyncio.run(_main_memory(sizes, Path(tmp)))
            except BenchFailure:
                _show_logs(Path(tmp))
                raise
    except BenchFailure as exc:
        _say(f"\nFAILED: {exc}")
        return 1
    except fabric.FabricError as exc:
        _say(f"\nFAILED: {type(exc).__name__}: {exc}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("\ninterrupted: subprocesses stopped, queues deleted")
        return 130
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    header = (
        f"Written by `{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC "
        f"({'quick: correctness only, not judged' if args.quick else 'full sizes'}), "
        f"{time.monotonic() - clock:.0f} s in all; fabric commit {_git_commit()}, python "
        f"{machine['python']}, RabbitMQ {machine['RabbitMQ']}, {machine['nproc']} CPUs shared with "
        f"other work (load average at start {machine['load average at start (1, 5, 15 min)']})."
    )
    section = render_s5(queued, completing, judge=not args.quick, header=header)
    _say("\n" + section + "\n")
    try:
        text = args.output.read_text()
    except OSError:
        text = "# fabric benchmark results\n"
    args.output.write_text(replace_s5_section(text, section))
    _say(f"all correctness checks passed; S5 written to {args.output}")
    return 0


async def _main_memory(sizes: MemorySizes, workdir: Path) -> tuple[QueuedResult, CompletingResult]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure_memory(sizes, workdir)


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    figure: str
    unit: str
    summary: Summary
    ratio: float | None = None
    ratio_text: str = ""
    target: str = ""
    met: bool | None = None


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "tasks/s":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    return f"{value:.3f}"


def build_rows(figures: dict[str, list[float]], sizes: Sizes) -> list[Row]:
    s = {k: Summary.of(v) for k, v in figures.items()}
    empty = Summary.of([])

    def get(key: str) -> Summary:
        return s.get(key, empty)

    def ratio(a: str, b: str) -> float:
        top, bottom = get(a).median, get(b).median
        return top / bottom if bottom and not math.isnan(bottom) else math.nan

    def judged(value: float, check: Callable[[float], bool]) -> bool | None:
        return None if math.isnan(value) else check(value)

    n = sizes.throughput
    s1, s2 = ratio("s1_tps", "base_tps"), ratio("s2_tps", "base_tps")
    p50, p99 = ratio("s3_p50", "base_p50"), ratio("s3_p99", "base_p99")
    growth = ratio("s4_large", "s4_small")
    small = get("s4_small").median
    e2e = get("s4_e2e").median
    return [
        Row(f"baseline throughput (raw aio-pika, {n:,} tasks)", "tasks/s", get("base_tps")),
        Row(f"baseline sequential p50 ({sizes.latency} round trips)", "ms", get("base_p50")),
        Row(f"baseline sequential p99 ({sizes.latency} round trips)", "ms", get("base_p99")),
        Row(
            f"S1 throughput ({n:,} one-task workflows, {sizes.workers} workers)",
            "tasks/s",
            get("s1_tps"),
            s1,
            f"{s1:.2f} x baseline",
            ">= 0.60 x",
            judged(s1, lambda v: v >= 0.6),
        ),
        Row(
            f"S2 wide DAG (1 workflow, {sizes.wide:,} tasks)",
            "tasks/s",
            get("s2_tps"),
            s2,
            f"{s2:.2f} x baseline",
            ">= 0.50 x",
            judged(s2, lambda v: v >= 0.5),
        ),
        Row(
            f"S3 latency p50 ({sizes.latency} sequential workflows)",
            "ms",
            get("s3_p50"),
            p50,
            f"{p50:.2f} x baseline",
            "<= 2.5 x",
            judged(p50, lambda v: v <= 2.5),
        ),
        Row(
            f"S3 latency p99 ({sizes.latency} sequential workflows)",
            "ms",
            get("s3_p99"),
            p99,
            f"{p99:.2f} x baseline",
            "<= 3.0 x",
            judged(p99, lambda v: v <= 3.0),
        ),
        Row(
            f"S4 admit() {sizes.admit_small:,}-task random DAG (CPU)",
            "s",
            get("s4_small"),
            None,
            "",
            "< 1 s",
            judged(small, lambda v: v < 1.0),
        ),
        Row(
            f"S4 admit() {sizes.admit_large:,}-task random DAG (CPU)",
            "s",
            get("s4_large"),
            growth,
            f"{growth:.1f} x the {sizes.admit_small:,}-task time",
            "< 12 x",
            judged(growth, lambda v: v < 12.0),
        ),
        Row(
            f"S4 submit -> accepted, {sizes.admit_e2e:,} tasks (router, no workers)",
            "s",
            get("s4_e2e"),
            None,
            "",
            "< 1 s",
            judged(e2e, lambda v: v < 1.0),
        ),
    ]


def render_table(rows: list[Row], *, judge: bool) -> str:
    header = "| figure | median | spread (min - max) | vs baseline | target | verdict |"
    lines = [header, "|---|---:|---:|---|---|---|"]
    for row in rows:
        s = row.summary
        spread = f"{_fmt(s.low, row.unit)} - {_fmt(s.high, row.unit)}" if s.rounds else "n/a"
        if row.met is None or not row.target:
            verdict = ""
        elif not judge:
            verdict = "not judged (--quick)"
        else:
            verdict = "met" if row.met else "**MISSED**"
        lines.append(
            f"| {row.figure} | {_fmt(s.median, row.unit)} {row.unit} | {spread} | {row.ratio_text} "
            f"| {row.target} | {verdict} |"
        )
    lines.append(
        "| S5 memory (RSS while 500,000 tasks complete / 100,000 queued) | see S5 below | | | | "
        "`make bench-memory` |"
    )
    return "\n".join(lines)


# -- facts ----------------------------------------------------------------------------------------


def _rabbitmq_version() -> str:
    try:
        out = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=20, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (rabbitmqctl not available)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=ROOT,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def facts() -> dict[str, str]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "python": platform.python_version(),
        "aio-pika": aio_pika.__version__,
        "msgpack": ".".join(str(p) for p in msgpack.version),
        "RabbitMQ": _rabbitmq_version(),
        "fabric": f"{fabric.__version__} (commit {_git_commit()}, working tree as run)",
        "nproc": str(affinity),
        "CPU": _cpu_model(),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "load average at start (1, 5, 15 min)": load,
    }


def write_results(
    path: Path,
    *,
    table: str,
    figures: dict[str, list[float]],
    sizes: Sizes,
    args: argparse.Namespace,
    machine: dict[str, str],
    started: dt.datetime,
    duration_s: float,
    profile: dict[str, str],
) -> None:
    command = "python -m bench.run" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:]))
    per_round = ["| figure | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |"]
    per_round.append("|---|" + "---:|" * args.rounds)
    for key, values in figures.items():
        if key.startswith("cpu_"):
            continue  # summarised in "CPU per task"
        per_round.append(f"| {key} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
    mode = (
        "quick (smoke: correctness only, figures not judged)"
        if args.quick
        else "full (the issue's sizes)"
        if args.full
        else "default"
    )
    lines = [
        "# fabric benchmark results",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC; sizes {mode}, {args.rounds} round(s), "
        f"{duration_s:.0f} s in all.",
        "Medians over the rounds with their spread; each ratio is fabric's median over the baseline's",
        "median measured in this same run (issue 6). Every correctness check passed (each workflow",
        "succeeded with the right results), otherwise this file would not have been written.",
        "",
        table,
        "",
        "## What ran",
        "",
        f"- **baseline**: aio-pika + msgpack; the producer (bench process) publishes each task persistent "
        f"with publisher confirms to a durable queue, keeping {sizes.window} in flight; one worker process "
        f"consumes with prefetch {PREFETCH}, publishes the result persistent and confirmed, then acks; the "
        f"producer consumes the results. Sequential mode: one round trip at a time.",
        f"- **fabric**: `python -m fabric.cli router` and {sizes.workers} x `python -m fabric.cli worker "
        f"workers.demo:agent --concurrency {sizes.concurrency}` as subprocesses, SQLite store with "
        "durable commits (synchronous=FULL, the default), publisher confirms and persistent messages "
        "everywhere; the client is `FabricClient` in the bench process.",
        f"- **S1**: {sizes.throughput:,} one-task `demo.echo` workflows through `client.run`, "
        f"{sizes.window} in flight, first submit to last `completed`; each result checked.",
        f"- **S2**: one workflow `root -> {sizes.wide - 2:,} x demo.echo -> join (demo.sum)`, submit to "
        "`completed`; tasks/s = tasks / elapsed; every result and the join's sum checked.",
        f"- **S3**: {sizes.latency} sequential `client.run` of one `demo.echo` task (submit -> completed).",
        f"- **S4**: `fabric.router.admission.admit` on the msgpack body of a random DAG (each task depends "
        f"on 0-3 of the 1,000 before it, ~5 % roots) of {sizes.admit_small:,} and {sizes.admit_large:,} "
        f"tasks (pure CPU, in the bench process); and `client.submit` of a {sizes.admit_e2e:,}-task DAG "
        "to a router with no workers, until `accepted` (stored, roots published and confirmed). The "
        "router refuses more than 10,000 tasks by default (`FABRIC_ROUTER__MAX_TASKS`), so the "
        "100,000-task growth is measured on `admit()` alone.",
        "- **S5** (memory) is a target of its own (`make bench-memory`); its section below is kept from",
        "  its last run.",
        "",
        "Each round runs: baseline throughput, S1, S2, baseline latency, S3, S4. A warm-up precedes round 1.",
        "The machine is shared and noisy: compare ratios from one run, not absolute figures across runs.",
        "",
        "## Per round",
        "",
        *per_round,
        "",
        "## Versions and machine",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "## Sizes",
        "",
        *[f"- {k}: {v:,}" for k, v in asdict(sizes).items()],
        "",
    ]
    lines += render_cpu(figures)
    if profile:
        lines += ["## Profile (one extra S1 pass under py-spy, not counted)", ""]
        for text in profile.values():
            lines += ["```", text.rstrip(), "```", ""]
    s5 = _s5_section(path)
    if s5:
        lines += [s5, ""]
    path.write_text("\n".join(lines))


_CPU_SCENARIOS = {"base": "baseline", "s1": "S1", "s2": "S2"}


def render_cpu(figures: dict[str, list[float]]) -> list[str]:
    """The "CPU per task" section: medians of each process's CPU milliseconds per task, and the rate
    the whole machine's cores would allow if nothing else ran (cores x 1000 / total ms per task)."""
    per: dict[str, dict[str, float]] = {}
    for key, values in figures.items():
        if key.startswith("cpu_") and "[" in key:
            scenario, name = key[4:].split("[", 1)
            per.setdefault(scenario, {})[name.rstrip("]")] = Summary.of(values).median
    if not per:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    names = list(dict.fromkeys(name for procs in per.values() for name in procs))
    lines = [
        "## CPU per task",
        "",
        "CPU milliseconds per task of each process (user + system, all threads, from `/proc`; medians over "
        "the rounds), and the most tasks/s the machine's cores allow at that cost (cores x 1000 / total, "
        "as if nothing else ran). Where a scenario needs more CPU per task than the baseline, its ceiling "
        "ratio is the best it can reach on this machine however its work is spread over processes. The "
        "broker column counts everything the broker did meanwhile, for any client: judge it on a quiet "
        "machine.",
        "",
        "| scenario | " + " | ".join(names) + f" | total | ceiling on {cores} cores |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    base_total = sum(per.get("base", {}).values())
    for scenario, label in _CPU_SCENARIOS.items():
        procs = per.get(scenario)
        if not procs:
            continue
        total = sum(procs.values())
        ceiling = cores * 1000.0 / total if total else math.nan
        vs = f" ({base_total / total:.2f} x the baseline's)" if scenario != "base" and total else ""
        cells = " | ".join(f"{procs[n]:.2f}" if n in procs else "" for n in names)
        lines.append(f"| {label} | {cells} | {total:.2f} | {ceiling:,.0f} tasks/s{vs} |")
    return [*lines, ""]


def _s5_section(path: Path) -> str:
    """The S5 section of the results file at ``path`` (markers included), or "" when it has none."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find(S5_BEGIN), text.find(S5_END)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(S5_END)]


def replace_s5_section(text: str, section: str) -> str:
    """``text`` with its S5 section replaced by ``section`` (appended when it has none)."""
    start, end = text.find(S5_BEGIN), text.find(S5_END)
    if start < 0 or end < start:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return text[:start] + section + text[end + len(S5_END) :]


# -- entry point ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="fabric against the raw broker limit (issue 6)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, tiny sizes: correctness smoke run")
    parser.add_argument("--full", action="store_true", help="the issue's sizes (S1 20,000, S3 500)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 3)")
    parser.add_argument("--output", type=Path, default=None, help="where to write the results (markdown)")
    parser.add_argument(
        "--profile", type=Path, default=None, help="also run S1 once under py-spy; write reports here"
    )
    parser.add_argument(
        "--scenario",
        choices=("s1-s4", "s5"),
        default="s1-s4",
        help="s1-s4 (default): the baseline and S1-S4; s5: the memory scenario alone (long)",
    )
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.scenario == "s5" and (args.full or args.profile):
        parser.error("--scenario s5 takes --quick or nothing (its full form is the default)")
    if args.output is None:
        args.output = Path(tempfile.gettempdir()) / "fabric-bench-quick.md" if args.quick else RESULTS
    return args


async def _main(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    # SIGTERM (CI cancelling, `kill`) unwinds like Ctrl-C: every subprocess stopped, every queue deleted.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(args, sizes, workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scenario == "s5":
        return main_memory(args)
    sizes = QUICK if args.quick else FULL if args.full else DEFAULT
    machine = facts()
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()
    _say(
        f"fabric bench: {'quick' if args.quick else 'full' if args.full else 'default'} sizes, "
        f"{args.rounds} round(s), broker {amqp_url().rsplit('@', 1)[-1]}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp:
            try:
                outcome = asyncio.run(_main(args, sizes, Path(tmp)))
            except BenchFailure:
                _show_logs(Path(tmp))
                raise
    except BenchFailure as exc:
        _say(f"\nFAILED: {exc}")
        return 1
    except fabric.FabricError as exc:
        _say(f"\nFAILED: {type(exc).__name__}: {exc}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("\ninterrupted: subprocesses stopped, queues deleted")
        return 130
    rows = build_rows(outcome["figures"], sizes)
    table = render_table(rows, judge=not args.quick)
    _say("\n" + table + "\n")
    write_results(
        args.output,
        table=table,
        figures=outcome["figures"],
        sizes=sizes,
        args=args,
        machine=machine,
        started=started,
        duration_s=time.monotonic() - clock,
        profile=outcome["profile"],
    )
    _say(f"all correctness checks passed; results written to {args.output}")
    return 0


def _show_logs(workdir: Path) -> None:
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            tail = "\n".join(text.splitlines()[-20:])
            _say(f"--- {log.name} (last lines) ---\n{tail}")


if __name__ == "__main__":
    sys.exit(main())
