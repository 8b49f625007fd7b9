"""The router's background loops (fabric.router.periodic.Periodic): a named task, one pass per
interval, only while active (the standby step otherwise), failures logged by name and survived, a
stop that ends the loop at once; and the keyed locks every workflow change holds."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fabric.router.locks import KeyedLocks
from fabric.router.periodic import Periodic
from tests.conftest import eventually

TICK = 0.01


class Calls:
    def __init__(self) -> None:
        self.steps = 0
        self.standbys = 0

    async def step(self) -> None:
        self.steps += 1

    async def standby(self) -> None:
        self.standbys += 1


@pytest.mark.parametrize(
    ("active", "expect_steps", "expect_standbys"),
    [(None, True, False), (True, True, False), (False, False, True)],
)
async def test_a_pass_runs_the_step_while_active_and_the_standby_otherwise(
    active: bool | None, expect_steps: bool, expect_standbys: bool
) -> None:
    calls = Calls()

    async def is_active() -> bool:
        assert active is not None
        return active

    loop = Periodic(
        "probe", calls.step, TICK, active=None if active is None else is_active, standby=calls.standby
    )
    loop.start()
    try:
        await eventually(lambda: loop.passes >= 3, timeout=10, what="three passes")
    finally:
        await loop.stop()
    assert (calls.steps > 0) is expect_steps
    assert (calls.standbys > 0) is expect_standbys


async def test_the_loop_is_a_named_task_and_waits_an_interval_before_its_first_pass() -> None:
    calls = Calls()
    loop = Periodic("lease check", calls.step, 60)
    loop.start()
    try:
        await asyncio.sleep(TICK)
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert "fabric-router lease check" in names
        assert loop.running
        assert calls.steps == 0  # an interval first
    finally:
        await loop.stop()
    assert not loop.running


async def test_at_once_runs_the_first_pass_at_start() -> None:
    calls = Calls()
    loop = Periodic("metrics refresh", calls.step, 60, at_once=True)
    loop.start()
    try:
        await eventually(lambda: calls.steps == 1, timeout=10, what="the first pass")
    finally:
        await loop.stop()


async def test_a_failing_pass_is_logged_by_name_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = 0

    async def broken() -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("store is down")

    loop = Periodic("stall watchdog", broken, TICK, level=logging.WARNING)
    with caplog.at_level(logging.DEBUG, logger="fabric.router"):
        loop.start()
        try:
            await eventually(lambda: failures >= 3, timeout=10, what="three failed passes")
            assert loop.running
        finally:
            await loop.stop()
    failed = [
        r for r in caplog.records if "stall watchdog failed (will try again): store is down" in r.message
    ]
    assert failed
    assert all(r.levelno == logging.WARNING for r in failed)


async def test_a_failing_active_check_is_a_failed_pass_too(caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()

    async def no_broker() -> bool:
        raise ConnectionError("broker gone")

    loop = Periodic("lease check", calls.step, TICK, active=no_broker)
    with caplog.at_level(logging.ERROR, logger="fabric.router"):
        loop.start()
        try:
            await eventually(lambda: loop.passes >= 2, timeout=10, what="two passes")
        finally:
            await loop.stop()
    assert calls.steps == 0
    assert "lease check failed (will try again): broker gone" in caplog.text


async def test_stop_cancels_a_pass_running_and_ends_the_loop() -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = Periodic("periodic recovery", slow, TICK)
    loop.start()
    await asyncio.wait_for(entered.wait(), timeout=10)
    await asyncio.wait_for(loop.stop(), timeout=10)
    assert cancelled.is_set()
    assert not loop.running


async def test_stop_before_start_and_twice_is_harmless_and_a_second_start_is_refused() -> None:
    calls = Calls()
    loop = Periodic("dashboard sample", calls.step, TICK)
    await loop.stop()
    loop.start()
    with pytest.raises(RuntimeError, match="already started"):
        loop.start()
    await loop.stop()
    await loop.stop()
    assert not loop.running


@pytest.mark.parametrize("interval", [0, -1.0])
def test_an_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Periodic("probe", Calls().step, interval)


async def test_keyed_locks_serialize_one_key_and_let_others_run_and_forget_released_keys() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def hold(key: str, name: str, wait: asyncio.Event | None = None) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if wait is not None:
                first_in.set()
                await wait.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(hold("wf-1", "a", release))
    await first_in.wait()
    second = asyncio.create_task(hold("wf-1", "b"))
    other = asyncio.create_task(hold("wf-2", "c"))
    await asyncio.wait_for(other, timeout=10)  # another key is not held up
    await asyncio.sleep(TICK)
    assert "b in" not in order  # the same key waits
    assert len(locks) == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    assert order.index("a out") < order.index("b in")
    assert len(locks) == 0  # nobody holds or waits: the lock is dropped


async def test_keyed_locks_release_on_error() -> None:
    locks = KeyedLocks()
    with pytest.raises(KeyError):
        async with locks.hold("wf"):
            raise KeyError("boom")
    assert len(locks) == 0
    async with locks.hold("wf"):
        pass
