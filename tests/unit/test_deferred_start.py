"""The worker's deferred ``started`` event (``FABRIC_WORKER__STARTED_AFTER_S``), without a broker."""

from __future__ import annotations

import asyncio

import pytest

from fabric.errors import TransportError
from fabric.worker.settlement import DeferredStart


class Sender:
    """Stands in for publishing the event: counts sends, or fails like a publish with no confirm."""

    def __init__(self, fail: bool = False) -> None:
        self.sent = 0
        self.fail = fail
        self.tried = asyncio.Event()

    async def send(self) -> None:
        await asyncio.sleep(0)
        self.tried.set()
        if self.fail:
            raise TransportError("no confirm")
        self.sent += 1


async def test_a_task_ending_before_the_delay_sends_nothing() -> None:
    sender = Sender()
    announcer = DeferredStart(sender.send(), 30.0)
    assert await announcer.settle() is False
    announcer.cancel()  # as the attempt's finally does: harmless twice
    assert sender.sent == 0
    assert not sender.tried.is_set()


async def test_a_task_outliving_the_delay_sends_it_before_settling() -> None:
    sender = Sender()
    announcer = DeferredStart(sender.send(), 0.01)
    await asyncio.wait_for(sender.tried.wait(), timeout=10)
    assert await announcer.settle() is True
    assert sender.sent == 1


async def test_a_started_event_that_could_not_be_sent_fails_the_settle() -> None:
    sender = Sender(fail=True)
    announcer = DeferredStart(sender.send(), 0.01)
    await asyncio.wait_for(sender.tried.wait(), timeout=10)
    with pytest.raises(TransportError):
        await announcer.settle()
