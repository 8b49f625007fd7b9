"""A worker's background tasks: stopped all together, never the one doing the stopping; failures are
logged, a cancel of the caller is not swallowed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fabric.worker.background import Background, stop, to_stop


async def test_to_stop_leaves_out_the_stopping_task_and_the_finished_ones() -> None:
    sleeping = asyncio.create_task(asyncio.sleep(60))
    stopping = asyncio.create_task(asyncio.sleep(60))
    finished = asyncio.create_task(asyncio.sleep(0))
    await finished
    try:
        assert to_stop([sleeping, stopping, finished], stopping) == [sleeping]
        assert to_stop([sleeping, stopping], None) == [sleeping, stopping]
        assert to_stop([], stopping) == []
    finally:
        sleeping.cancel()
        stopping.cancel()
        await asyncio.gather(sleeping, stopping, return_exceptions=True)


async def test_stopping_from_a_background_task_runs_that_task_to_its_end() -> None:
    """The stop after a fatal error runs in a background task and stops them all: it goes on."""
    tasks = Background()
    other = tasks.start("rescore", asyncio.sleep(60))
    ended = asyncio.Event()

    async def fatal_stop() -> None:
        await tasks.stop_all()
        await asyncio.sleep(0.01)  # an await after the stop: a pending self-cancel would land here
        ended.set()

    closing = tasks.start("fatal-drain", fatal_stop())
    await asyncio.wait_for(asyncio.shield(closing), timeout=5)
    assert ended.is_set()
    assert not closing.cancelled()
    assert other.cancelled()
    assert not tasks.running("rescore")
    assert not tasks.running("fatal-drain")


async def test_a_background_task_that_fails_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("scoring broke")

    task = Background().start("rescore", broken())
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert "background task rescore failed: scoring broke" in caplog.text


async def test_stop_logs_a_failure_and_passes_a_cancel_of_the_caller_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("could not clean up")

    failing = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="fabric.worker"):
        await stop(failing, "heartbeats")
    assert "heartbeats failed: could not clean up" in caplog.text

    waited = asyncio.create_task(asyncio.sleep(60))

    async def stopping() -> None:
        await stop(waited, "sync")

    caller = asyncio.create_task(stopping())
    await asyncio.sleep(0)  # the caller waits in stop() now
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.gather(waited, return_exceptions=True)


async def test_stop_never_cancels_the_running_task_and_accepts_none() -> None:
    async def stops_itself() -> str:
        await stop(asyncio.current_task(), "self")
        await asyncio.sleep(0)
        return "went on"

    assert await asyncio.create_task(stops_itself()) == "went on"
    await stop(None, "nothing")


async def test_one_background_task_is_stopped_by_name_the_others_run_on() -> None:
    """The drain stops the heartbeats before the final one is sent; the watchdog runs on till close."""
    tasks = Background()
    heartbeats = tasks.start("heartbeats", asyncio.sleep(60))
    watchdog = tasks.start("watchdog", asyncio.sleep(60))
    await tasks.stop("heartbeats")
    assert heartbeats.cancelled()
    assert not tasks.running("heartbeats")
    assert tasks.running("watchdog")
    await tasks.stop("unknown")  # nothing by that name: nothing happens
    await tasks.stop_all()
    assert watchdog.cancelled()


async def test_a_background_task_stopping_itself_by_name_goes_on() -> None:
    tasks = Background()
    ended = asyncio.Event()

    async def stop_self() -> None:
        await tasks.stop("self")
        await asyncio.sleep(0)
        ended.set()

    await tasks.start("self", stop_self())
    assert ended.is_set()
