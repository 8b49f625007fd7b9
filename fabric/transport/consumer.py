"""Consuming: consumers on a channel of their own, re-subscribed after a reconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from fabric.errors import TopologyMismatch, TransportError
from fabric.transport.base import Delivery, DeliveryCallback
from fabric.transport.connection import CANCEL_TIMEOUT_S, AmqpLink
from fabric.transport.delivery import AmqpDelivery, guard_callback

#: Longest wait for the broker's answer when a consumer changes its priority.
_RESUBSCRIBE_TIMEOUT_S = 10.0


class Consumer:
    """A running consumer; :meth:`cancel` stops new deliveries (in-flight ones stay to be settled).

    ``priority`` is the consumer priority (the ``x-priority`` argument of basic.consume): the broker
    gives a queue's messages to its highest-priority consumers that have room first.
    """

    def __init__(
        self,
        queue: AbstractQueue,
        tag: str,
        channel: AbstractChannel,
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]] | None = None,
        *,
        priority: int | None = None,
    ) -> None:
        self.queue_name = queue.name
        self._queue = queue
        self._tag = tag
        self._channel = channel
        self._on_message = on_message
        self.priority = priority
        self.active = True
        #: Times this consumer was subscribed (the first time, breaker closing, watchdog, new priority).
        self.subscriptions = 1
        # One change of subscription at a time: a watchdog re-subscribing while a new priority is
        # being applied would leave two consumers.
        self._lock = asyncio.Lock()

    async def _subscribe(self, timeout: float | None = None) -> None:
        assert self._on_message is not None
        self._tag = await self._queue.consume(
            self._on_message, arguments=_consumer_arguments(self.priority), timeout=timeout
        )
        self.subscriptions += 1

    async def resume(self) -> None:
        """Subscribe again after :meth:`cancel` (a circuit breaker closing)."""
        async with self._lock:
            await self._resume()

    async def _resume(self) -> None:
        if self.active or self._on_message is None:
            return
        try:
            await self._subscribe()
        except (aiormq.exceptions.AMQPError, RuntimeError, TimeoutError) as exc:
            raise TransportError(f"cannot consume {self.queue_name} again: {exc!r}") from exc
        self.active = True

    async def set_priority(self, priority: int) -> None:
        """Consume with consumer priority ``priority`` from now on.

        The broker cannot change a consumer's arguments, so this cancels the consumer and subscribes
        again on the same channel. Nothing is lost or delivered twice: basic.cancel leaves the
        deliveries already made unacked on the channel, to be acked there as usual, and messages the
        broker sent before its cancel-ok still reach the callback (the tag is only forgotten on
        cancel-ok). Cancel first, then consume: two consumers at once would each get the prefetch
        (per-consumer QoS). A cancelled consumer (open breaker) only records the priority for
        :meth:`resume`.

        Raises:
            TransportError: the broker refused; if the new basic.consume failed, the consumer is left
                :attr:`active` but not :attr:`healthy`, so the worker's watchdog subscribes it again.
        """
        async with self._lock:
            if priority == self.priority:
                return
            if self.active and self._channel.is_closed:
                # Reconnecting: the robust channel restores the consumer as it was; try again later.
                raise TransportError(f"cannot change the priority of {self.queue_name}: its channel is down")
            self.priority = priority
            if not self.active or self._on_message is None:
                return
            try:
                await self._queue.cancel(self._tag, timeout=_RESUBSCRIBE_TIMEOUT_S)
                await self._subscribe(timeout=_RESUBSCRIBE_TIMEOUT_S)
            except (aiormq.exceptions.AMQPError, RuntimeError, TimeoutError) as exc:
                raise TransportError(
                    f"cannot consume {self.queue_name} with priority {priority}: {exc}"
                ) from exc

    async def resubscribe(self) -> None:
        """Subscribe again after the broker cancelled this consumer (e.g. its queue was deleted)."""
        async with self._lock:
            with contextlib.suppress(Exception):
                # Forget the dead tag, so a reconnect does not restore it.
                await asyncio.wait_for(self._queue.cancel(self._tag), self._cancel_wait_s())
            self.active = False
            await self._resume()

    async def get_one(self) -> AmqpDelivery | None:
        """Take one message with basic.get on this consumer's channel (a circuit breaker's probe).

        Raises:
            TransportError: the broker refused, did not answer, or the channel is closed (reconnecting:
                try again later).
        """
        try:
            message = await self._queue.get(no_ack=False, fail=False)
        except (aiormq.exceptions.AMQPError, RuntimeError, TimeoutError) as exc:
            # A closed channel (the connection is being restored) raises ChannelInvalidStateError, a
            # RuntimeError that is no AMQPError.
            raise TransportError(f"cannot get from {self.queue_name}: {exc!r}") from exc
        return None if message is None else AmqpDelivery(message)

    @property
    def healthy(self) -> bool:
        """True while the broker delivers to this consumer: subscribed on the current, open channel.

        After a reconnect the robust channel re-subscribes; until it has, this is False.
        """
        if not self.active or self._channel.is_closed:
            return False
        # aio-pika offers the underlying aiormq channel only through a coroutine or a deprecated
        # property; a health check must stay synchronous and quiet, so read the attribute it wraps.
        underlay = getattr(self._channel, "_channel", None)
        underlying = getattr(underlay, "channel", None)
        return self._tag in getattr(underlying, "consumers", {})

    async def bind(self, exchange: str, routing_key: str) -> None:
        """Bind this consumer's queue; the binding is restored after a reconnect."""
        try:
            await self._queue.bind(exchange, routing_key)
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(
                f"cannot bind {self.queue_name} to {exchange} ({routing_key}): {exc}"
            ) from exc

    async def cancel(self) -> None:
        async with self._lock:
            if not self.active:
                return
            self.active = False
            # The robust queue forgets the consumer at once (no re-subscription after a reconnect); the
            # basic.cancel itself waits for the channel, which never comes back while the broker is
            # unreachable, so a worker stopping (or a breaker opening) during an outage must not wait
            # for it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(self._tag), self._cancel_wait_s())

    def _cancel_wait_s(self) -> float:
        return CANCEL_TIMEOUT_S if not self._channel.is_closed else 0.05

    async def close(self) -> None:
        await self.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._channel.close(), CANCEL_TIMEOUT_S)


class AmqpConsuming(AmqpLink):
    """The consuming part of :class:`fabric.transport.amqp.AmqpConnection`."""

    def __init__(self, url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> None:
        super().__init__(url, name=name, publish_timeout_s=publish_timeout_s)
        self._consumers: list[Consumer] = []
        #: Callbacks running on deliveries; they outlive the channel that delivered them (guard_callback).
        self._handlers: set[asyncio.Task[None]] = set()

    async def _release(self) -> None:
        for consumer in self._consumers:
            await consumer.close()
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await super()._release()

    async def consume(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
    ) -> Consumer:
        """Consume ``queue`` on a channel of its own with ``prefetch`` unacked deliveries at most.

        The callback runs once per delivery, concurrently up to ``prefetch``; it must settle the delivery.
        The consumer is re-subscribed after a reconnect.
        """
        consumers = await self.consume_many({queue: callback}, prefetch=prefetch)
        return consumers[0]

    async def consume_many(
        self,
        callbacks: Mapping[str, DeliveryCallback],
        *,
        prefetch: int,
        priorities: Mapping[str, int] | None = None,
        channel_wide: bool = False,
    ) -> list[Consumer]:
        """Consume several queues on one channel sharing one ``prefetch`` limit (channel-wide QoS).

        A worker serving several capabilities holds at most ``prefetch`` unacked tasks in all, so it
        never hoards work that idle workers could take. ``priorities`` gives the consumer priority
        (``x-priority``) per queue; queues not in it consume without one. ``channel_wide`` makes the
        limit the channel's even for one queue: a consumer subscribed again (new priority, breaker,
        watchdog) while deliveries of its predecessor are unacked must count those, or the broker
        would hand it a full prefetch more (per-consumer limits start from zero).
        """
        connection, _ = self._require()
        consumers = []
        try:
            channel = await connection.channel(publisher_confirms=False)
            # global_=True: RabbitMQ applies the limit to the channel, shared by all its consumers.
            await channel.set_qos(prefetch_count=prefetch, global_=channel_wide or len(callbacks) > 1)
            for queue, callback in callbacks.items():
                # A passive declare registers the queue with the robust channel, which re-subscribes
                # its consumers after a reconnect (get_queue(ensure=False) would not).
                declared = await channel.declare_queue(queue, passive=True)
                on_message = guard_callback(queue, callback, self._handlers)
                priority = (priorities or {}).get(queue)
                tag = await declared.consume(on_message, arguments=_consumer_arguments(priority))
                consumers.append(Consumer(declared, tag, channel, on_message, priority=priority))
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMismatch(queue, "queue does not exist (declare the topology first)") from exc
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"cannot consume {queue}: {exc}") from exc
        self._consumers.extend(consumers)
        return consumers

    @contextlib.asynccontextmanager
    async def browse(self, queue: str, *, limit: int) -> AsyncIterator[list[Delivery]]:
        """Take up to ``limit`` messages of ``queue`` (basic.get) for inspection.

        Inside the block, ack the ones to remove; every message left unsettled goes back to the queue
        at its place when the block ends.
        """
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        deliveries: list[Delivery] = []
        try:
            declared = await channel.declare_queue(queue, passive=True)
            while len(deliveries) < limit:
                message = await declared.get(no_ack=False, fail=False)
                if message is None:
                    break
                deliveries.append(AmqpDelivery(message))
            yield deliveries
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMismatch(queue, "queue does not exist") from exc
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"cannot read {queue}: {exc}") from exc
        finally:
            for delivery in deliveries:
                await delivery.nack(requeue=True)
            with contextlib.suppress(Exception):
                await channel.close()

    async def reply_queue(self, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        """Declare an exclusive, auto-named queue and consume it (for replies and followed notifications).

        It disappears with the connection and is declared again, with its bindings and consumer, after a
        reconnect.
        """
        connection, _ = self._require()
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            declared = await channel.declare_queue("", exclusive=True, auto_delete=True)
            tag = await declared.consume(guard_callback(declared.name, callback, self._handlers))
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"cannot declare a reply queue: {exc}") from exc
        consumer = Consumer(declared, tag, channel)
        self._consumers.append(consumer)
        return consumer


def _consumer_arguments(priority: int | None) -> dict[str, Any] | None:
    return None if priority is None else {"x-priority": priority}
