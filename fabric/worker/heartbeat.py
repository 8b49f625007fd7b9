"""Heartbeats (docs/protocol.md §6): every ``heartbeat_interval_s`` the worker publishes where it stands
to ``{ns}.heartbeats``, renewing the leases of its leased attempts; a stopping worker says so once
(``health: stopped``), so the router shows it stopped rather than lost.

Example:
    >>> heartbeats = Heartbeats(amqp, ns, interval_s=5.0, beat=worker_beat)
    >>> background.start("heartbeats", heartbeats.run(leased=..., health=..., each=...))
    >>> await heartbeats.final("demo@host:42")
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fabric.errors import TransportError
from fabric.protocol import codec
from fabric.protocol.messages import Heartbeat, HeartbeatHealth
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from fabric.worker.attempts import Running

log = logging.getLogger("fabric.worker")

#: How long a stopping worker waits for the broker to confirm its final (``stopped``) heartbeat.
FINAL_BEAT_TIMEOUT_S = 2.0


class Heartbeats:
    """Sends this worker's heartbeats.

    Args:
        amqp: the worker's broker connection.
        ns: the namespace.
        interval_s: seconds between heartbeats.
        beat: this agent's heartbeat now, with ``health`` as given, renewing the leases of the
            attempts given.
    """

    def __init__(
        self,
        amqp: AmqpConnection,
        ns: str,
        *,
        interval_s: float,
        beat: Callable[[HeartbeatHealth, list[Running]], Heartbeat],
    ) -> None:
        self._amqp = amqp
        self._ns = ns
        self._interval_s = interval_s
        self._beat = beat

    async def send(self, beat: Heartbeat) -> None:
        """Publish a heartbeat (confirmed); raises TransportError when it is not sent."""
        await self._amqp.publish(
            names.heartbeats_exchange(self._ns),
            "",
            codec.encode(beat.model_dump(mode="python")),
            persistent=False,
            mandatory=False,
            expiration_s=max(beat.interval_s * 3, 1.0),
        )

    async def run(
        self,
        *,
        leased: Callable[[], list[Running]],
        health: Callable[[], HeartbeatHealth],
        each: Callable[[], None],
    ) -> None:
        """Send a heartbeat every interval until cancelled. Before each: ``each()`` (the worker's
        periodic chores), then ``leased()``: the leased attempts whose leases still hold."""
        while True:
            each()
            # Leases are checked before the beat: after the event loop stalled, a beat would renew them
            # at the router though they went unrenewed too long.
            renewing = leased()
            sent_at = time.monotonic()
            beat = self._beat(health(), renewing)
            try:
                await self.send(beat)
            except TransportError as exc:
                log.warning("heartbeat not sent: %s", exc)
            else:
                for running in renewing:
                    running.renewed_at = max(running.renewed_at, sent_at)
            await asyncio.sleep(self._interval_s)

    async def final(self, agent_id: str) -> None:
        """Tell the router this agent stopped (``health: stopped``), so it is shown ``stopped``, not
        ``lost``. Waits at most :data:`FINAL_BEAT_TIMEOUT_S` for the broker's confirm: exiting is never
        held up longer (without it the router calls the agent lost, as before). It renews no lease."""
        if not self._amqp.connected:
            log.warning("worker %s: final heartbeat not sent: the broker connection is down", agent_id)
            return
        try:
            await asyncio.wait_for(self.send(self._beat("stopped", [])), FINAL_BEAT_TIMEOUT_S)
        except (TransportError, TimeoutError) as exc:
            log.warning("worker %s: final heartbeat not sent: %s", agent_id, exc or "no confirm in time")
