"""The raw broker limit fabric is compared with: an aio-pika + msgpack round trip (issue 6).

* The producer publishes each task (persistent, publisher confirms, ``mandatory``) to a durable queue.
* A worker process consumes it with prefetch 32, publishes a result (persistent, confirmed) and only
  then acks the task, exactly the order fabric's worker keeps.
* The producer consumes the results (and acks them).

Throughput keeps ``window`` tasks in flight (the same window the fabric S1 scenario uses) and counts
from the first publish to the last result; latency runs one task at a time.

The worker runs in a process of its own (``python -m bench.baseline worker ...``), like fabric's
workers, so the comparison is fair on a 2-core machine. Standalone::

    python -m bench.baseline --tasks 5000 --latency 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bench.common import (
    BenchFailure,
    Proc,
    amqp_url,
    eventually,
    percentile,
    python_command,
    run_all,
    unique_namespace,
)

MSGPACK = "application/msgpack"
PREFETCH = 32


def _message(payload: dict[str, Any], **props: Any) -> aio_pika.Message:
    return aio_pika.Message(
        msgpack.packb(payload, use_bin_type=True),
        content_type=MSGPACK,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **props,
    )


# -- the worker process ---------------------------------------------------------------------------


async def worker_main(url: str, tasks_queue: str, results_queue: str, prefetch: int) -> None:
    """Consume tasks, publish each result with a confirm, then ack the task; until SIGTERM."""
    connection = await aio_pika.connect(url, client_properties={"connection_name": "bench-baseline-worker"})
    try:
        publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consume = await connection.channel(publisher_confirms=False)
        await consume.set_qos(prefetch_count=prefetch)
        queue = await consume.get_queue(tasks_queue, ensure=False)

        async def on_task(message: AbstractIncomingMessage) -> None:
            task = msgpack.unpackb(message.body, raw=False)
            await publish.default_exchange.publish(
                _message({"id": task["id"], "result": task["input"]}, correlation_id=message.correlation_id),
                routing_key=results_queue,
                mandatory=True,
            )
            await message.ack()

        await queue.consume(on_task)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await connection.close()


# -- the producer (in the bench process) ----------------------------------------------------------


class Baseline:
    """Queues, one worker process and the producer of the baseline.

    Example:
        >>> async with Baseline(url, workdir) as baseline:
        ...     figures = await baseline.throughput(5000)
    """

    def __init__(self, url: str, workdir: Path, *, window: int = 256, prefetch: int = PREFETCH) -> None:
        self.url = url
        self.ns = unique_namespace("raw")
        self.tasks_queue = f"{self.ns}.tasks"
        self.results_queue = f"{self.ns}.results"
        self.window = window
        self.prefetch = prefetch
        self.workdir = workdir
        self.worker: Proc | None = None
        self._connection: AbstractConnection | None = None
        self._publish: AbstractChannel | None = None
        self._results: AbstractChannel | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0

    @property
    def worker_pid(self) -> int:
        assert self.worker is not None, "the baseline is not started"
        return self.worker.pid

    async def __aenter__(self) -> Self:
        try:
            self._connection = await aio_pika.connect(
                self.url, client_properties={"connection_name": "bench-baseline-producer"}
            )
            setup = await self._connection.channel(publisher_confirms=False)
            for name in (self.tasks_queue, self.results_queue):
                await setup.declare_queue(name, durable=True)
            await setup.close()
            self._publish = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._results = await self._connection.channel(publisher_confirms=False)
            await self._results.set_qos(prefetch_count=1000)
            queue = await self._results.get_queue(self.results_queue, ensure=False)
            await queue.consume(self._on_result)
            self.worker = Proc(
                "baseline-worker",
                python_command(
                    "-m",
                    "bench.baseline",
                    "worker",
                    "--url",
                    self.url,
                    "--tasks-queue",
                    self.tasks_queue,
                    "--results-queue",
                    self.results_queue,
                    "--prefetch",
                    str(self.prefetch),
                ),
                env=_env(),
                log_path=self.workdir / "baseline-worker.log",
            )
            await eventually(self._worker_consuming, timeout_s=60, what="the baseline worker to consume")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the worker, delete the queues, close the connection (safe to call more than once)."""
        if self.worker is not None:
            await self.worker.astop()
        if self._connection is not None and not self._connection.is_closed:
            if self._results is not None:
                # Closing the consuming channel first: a queue deleted under its consumer makes the
                # broker cancel it, which aio-pika reports as a warning.
                with contextlib.suppress(Exception):
                    await self._results.close()
            with contextlib.suppress(Exception):
                channel = await self._connection.channel(publisher_confirms=False)
                for name in (self.tasks_queue, self.results_queue):
                    with contextlib.suppress(Exception):
                        await channel.queue_delete(name)
                await channel.close()
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _worker_consuming(self) -> bool:
        assert self.worker is not None
        assert self._connection is not None
        self.worker.require_alive()
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue(self.tasks_queue, passive=True)
            return (queue.declaration_result.consumer_count or 0) > 0
        finally:
            await channel.close()

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        result = msgpack.unpackb(message.body, raw=False)
        await message.ack()
        future = self._pending.pop(result["id"], None)
        if future is not None and not future.done():
            future.set_result(result["result"])

    async def _round_trip(self, value: Any, timeout_s: float) -> Any:
        """Publish one task (confirmed) and wait for its result."""
        assert self._publish is not None
        task_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        try:
            await self._publish.default_exchange.publish(
                _message({"id": task_id, "input": value}, message_id=f"{self.ns}/{task_id}"),
                routing_key=self.tasks_queue,
                mandatory=True,
            )
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(task_id, None)

    async def throughput(self, n: int, *, timeout_s: float = 600.0) -> dict[str, Any]:
        """``n`` round trips, ``window`` in flight; tasks/s from the first publish to the last result."""
        semaphore = asyncio.Semaphore(self.window)
        wrong: list[int] = []

        async def one(i: int) -> None:
            async with semaphore:
                if await self._round_trip(i, timeout_s) != i:
                    wrong.append(i)

        started = time.perf_counter()
        await run_all([one(i) for i in range(n)], timeout_s=timeout_s, what="baseline round trips")
        elapsed = time.perf_counter() - started
        self._check()
        if wrong:
            raise BenchFailure(f"baseline: {len(wrong)} of {n} results were wrong (first: task {wrong[0]})")
        return {"n": n, "elapsed_s": elapsed, "tasks_per_s": n / elapsed}

    async def latency(self, n: int, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """``n`` sequential round trips; p50 and p99 in milliseconds."""
        samples: list[float] = []
        for i in range(n):
            started = time.perf_counter()
            result = await self._round_trip({"seq": i}, timeout_s)
            samples.append((time.perf_counter() - started) * 1000.0)
            if result != {"seq": i}:
                raise BenchFailure(f"baseline latency: wrong result for round trip {i}: {result!r}")
        self._check()
        return {"n": n, "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)}

    def _check(self) -> None:
        if self.worker is not None:
            self.worker.require_alive()


def _env() -> dict[str, str]:
    return dict(os.environ)


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="run the baseline worker (started by the producer)")
    worker.add_argument("--url", default=amqp_url())
    worker.add_argument("--tasks-queue", required=True)
    worker.add_argument("--results-queue", required=True)
    worker.add_argument("--prefetch", type=int, default=PREFETCH)
    parser.add_argument("--tasks", type=int, default=5000, help="round trips of the throughput run")
    parser.add_argument("--latency", type=int, default=300, help="sequential round trips")
    args = parser.parse_args(argv)
    if args.command == "worker":
        asyncio.run(worker_main(args.url, args.tasks_queue, args.results_queue, args.prefetch))
        return 0

    async def standalone() -> None:
        with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp:
            async with Baseline(amqp_url(), Path(tmp)) as baseline:
                await baseline.throughput(min(args.tasks, 500))  # warm-up
                print(json.dumps(await baseline.throughput(args.tasks)))
                print(json.dumps(await baseline.latency(args.latency)))

    try:
        asyncio.run(standalone())
    except BenchFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
