"""The AMQP adapter: the only module that imports aio-pika and aiormq.

Broker errors are translated here, once, into :mod:`fabric.errors`. Above this module fabric speaks of
publishing, consuming and settling deliveries; never of aio-pika objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import aiormq.connection
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from fabric.errors import NotConnectedError, PublishError, TopologyMismatch, TransportError
from fabric.topology.spec import BindingSpec, ExchangeSpec, QueueSpec, Topology
from fabric.topology.teardown import Deletion

log = logging.getLogger("fabric.transport")

#: Routing through the default exchange sends straight to the queue named by the routing key.
DEFAULT_EXCHANGE = ""
#: Longest wait for the broker to answer a consumer cancel or a channel close.
_CANCEL_TIMEOUT_S = 5.0
#: A server that does not send the AMQP greeting (``Connection.Start``) within this long after the
#: protocol header is not an AMQP broker: connecting fails then, instead of after the whole connect timeout.
GREETING_TIMEOUT_S = 3.0
#: A connect still not done after this long has the greeting checked on a connection of its own.
_PROBE_AFTER_S = 0.5

#: ``basic_publish(wait=False)``: return once the frames are queued for the socket instead of after an
#: extra event loop round trip for the write (aiormq versions without the argument always wait).
_NO_WAIT: dict[str, Any] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_publish).parameters else {}
)
_ACK_NO_WAIT: dict[str, Any] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_ack).parameters else {}
)


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What a passive declare tells about a queue."""

    name: str
    messages: int
    consumers: int


class Delivery:
    """One message received from a queue; settle it exactly once with :meth:`ack`, :meth:`nack` or
    :meth:`reject`. Settling after the channel died is logged, not raised: the broker redelivers."""

    __slots__ = ("_message", "settled")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self.settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.headers or {})

    @property
    def content_type(self) -> str | None:
        return self._message.content_type

    @property
    def message_id(self) -> str | None:
        return self._message.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._message.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._message.reply_to

    @property
    def priority(self) -> int:
        return self._message.priority or 0

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @property
    def routing_key(self) -> str:
        return self._message.routing_key or ""

    @property
    def user_id(self) -> str | None:
        return self._message.user_id

    async def ack(self) -> None:
        await self._settle("ack")

    async def nack(self, *, requeue: bool = True) -> None:
        await self._settle("nack", requeue=requeue)

    async def reject(self, *, requeue: bool = False) -> None:
        await self._settle("reject", requeue=requeue)

    async def _settle(self, how: str, **kwargs: Any) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            if how == "ack" and self._message.delivery_tag is not None:
                # Straight to aiormq without waiting for the frame to be written (aio-pika waits): the
                # ack is sent with the next write of this connection, and a crash before it reaches
                # the broker means a redelivery, exactly as a crash just before acking would.
                await self._message.channel.basic_ack(delivery_tag=self._message.delivery_tag, **_ACK_NO_WAIT)
                return
            await getattr(self._message, how)(**kwargs)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError, RuntimeError) as exc:
            # The channel closed under us: the broker will redeliver the message, which is the safe
            # outcome for at-least-once processing.
            log.warning(
                "could not %s message %s: %s (the broker will redeliver it)", how, self.message_id, exc
            )


DeliveryCallback = Callable[[Delivery], Awaitable[None]]

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

    async def get_one(self) -> Delivery | None:
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
        return None if message is None else Delivery(message)

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
        return _CANCEL_TIMEOUT_S if not self._channel.is_closed else 0.05

    async def close(self) -> None:
        await self.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._channel.close(), _CANCEL_TIMEOUT_S)


class AmqpConnection:
    """A robust AMQP connection with one confirmed publish channel and one channel per consumer.

    Example:
        >>> async with AmqpConnection(url, name="router") as amqp:
        ...     await amqp.declare(topology)
        ...     await amqp.publish("fabric.submit", "workflow", body)
    """

    def __init__(self, url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> None:
        self._url = url
        self._name = name
        self._publish_timeout_s = publish_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        #: The channel of :meth:`publish_unconfirmed` (no publisher confirms).
        self._unconfirmed_channel: AbstractChannel | None = None
        self._declared: set[ExchangeSpec | QueueSpec | BindingSpec] = set()
        self._consumers: list[Consumer] = []
        self._declare_lock = asyncio.Lock()
        self._closed = False
        #: Called with the exchange and the seconds from publish to the broker's confirm, for each
        #: confirmed publish (the publish-confirm latency metric).
        self.on_confirm: Callable[[str, float], None] | None = None
        #: Callbacks running on deliveries; they outlive the channel that delivered them (_guard_callback).
        self._handlers: set[asyncio.Task[None]] = set()
        #: Called (without arguments) when the connection is lost (not when it is closed on purpose)...
        self.on_lost: list[Callable[[], None]] = []
        #: ...and when it is back, with its channels, queues, bindings and consumers restored.
        self.on_restored: list[Callable[[], None]] = []

    async def __aenter__(self) -> AmqpConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        conn = self._connection
        return (
            conn is not None
            and not conn.is_closed
            and self._publish_channel is not None
            and not (self._publish_channel.is_closed)
        )

    async def connect(self, timeout_s: float = 15.0) -> None:
        """Open the connection and the publish channel.

        Raises:
            TransportError: the broker cannot be reached, refused the login or the virtual host, or the
                server at the URL is no AMQP broker (no greeting within :data:`GREETING_TIMEOUT_S`).
        """
        if self._connection is not None:
            raise NotConnectedError("this AmqpConnection is already connected; create a new one")
        try:
            self._connection = await _connect_or_explain(self._url, self._name, timeout_s)
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._unconfirmed_channel = await self._connection.channel(publisher_confirms=False)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            raise TransportError(
                f"cannot connect to the broker at {_safe_url(self._url)}: {_connect_failure(exc, self._url)}"
            ) from exc
        self._connection.close_callbacks.add(self._lost)
        self._connection.reconnect_callbacks.add(self._restored)

    def _lost(self, *_: object) -> None:
        if not self._closed:
            for callback in self.on_lost:
                callback()

    def _restored(self, *_: object) -> None:
        if not self._closed:
            for callback in self.on_restored:
                callback()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in self._consumers:
            await consumer.close()
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    def _require(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        if self._connection is None or self._publish_channel is None or self._closed:
            raise NotConnectedError("AmqpConnection is not connected: use 'async with AmqpConnection(...)'")
        return self._connection, self._publish_channel

    # -- topology ---------------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        """Declare every exchange, queue and binding of ``topology`` (idempotent, cached).

        Concurrent callers share one declaration: the cache is checked again under a lock, so a burst
        of publishes to a new capability opens one channel, not one per publish.

        Raises:
            TopologyMismatch: something exists with other arguments (drift); the message says what.
        """
        connection, _ = self._require()
        items: list[ExchangeSpec | QueueSpec | BindingSpec] = [
            *topology.exchanges,
            *topology.queues,
            *topology.bindings,
        ]
        if all(item in self._declared for item in items):
            return
        async with self._declare_lock:
            todo = [item for item in items if item not in self._declared]
            if not todo:
                return
            channel = await connection.channel(publisher_confirms=False)
            try:
                for item in todo:
                    try:
                        await self._declare_one(channel, item)
                    except aiormq.exceptions.ChannelPreconditionFailed as exc:
                        raise TopologyMismatch(_item_name(item), _precondition_text(exc)) from exc
                    except aiormq.exceptions.AMQPError as exc:
                        raise TransportError(f"declaring {_item_name(item)} failed: {exc}") from exc
                    self._declared.add(item)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _declare_one(
        self, channel: AbstractChannel, item: ExchangeSpec | QueueSpec | BindingSpec
    ) -> None:
        if isinstance(item, ExchangeSpec):
            await channel.declare_exchange(item.name, item.type.value, durable=True)
        elif isinstance(item, QueueSpec):
            await channel.declare_queue(item.name, durable=True, arguments=item.arguments_dict)
        else:
            queue = await channel.get_queue(item.queue, ensure=False)
            await queue.bind(item.exchange, item.routing_key, arguments=dict(item.arguments) or None)

    async def forget(self, topology: Topology) -> None:
        """Drop ``topology`` from the declare cache, so the next :meth:`declare` asks the broker again."""
        for item in (*topology.exchanges, *topology.queues, *topology.bindings):
            self._declared.discard(item)

    async def check(self, topology: Topology) -> list[str]:
        """Compare ``topology`` with the broker without creating anything; return the problems found."""
        connection, _ = self._require()
        problems: list[str] = []
        items: list[ExchangeSpec | QueueSpec] = [*topology.exchanges, *topology.queues]
        for item in items:
            channel = await connection.channel(publisher_confirms=False)
            try:
                if isinstance(item, ExchangeSpec):
                    await channel.declare_exchange(item.name, item.type.value, passive=True)
                    await channel.declare_exchange(item.name, item.type.value, durable=True)
                else:
                    await channel.declare_queue(item.name, passive=True)
                    await channel.declare_queue(item.name, durable=True, arguments=item.arguments_dict)
            except aiormq.exceptions.ChannelNotFoundEntity:
                problems.append(f"{item.name}: missing")
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                problems.append(f"{item.name}: {_precondition_text(exc)}")
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return problems

    async def delete(self, topology: Topology) -> None:
        """Delete every queue and exchange of ``topology`` (for tests and ``fabric topology delete``)."""
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        try:
            for queue in topology.queues:
                with contextlib.suppress(aiormq.exceptions.AMQPError):
                    await channel.queue_delete(queue.name)
            for exchange in topology.exchanges:
                with contextlib.suppress(aiormq.exceptions.AMQPError):
                    await channel.exchange_delete(exchange.name)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._declared.clear()

    async def exchanges_exist(self, exchanges: Iterable[str]) -> dict[str, bool]:
        """Whether each exchange exists (passive declares: nothing is created)."""
        connection, _ = self._require()
        found: dict[str, bool] = {}
        for exchange in exchanges:
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.declare_exchange(exchange, passive=True)
                found[exchange] = True
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[exchange] = False
            except aiormq.exceptions.AMQPError as exc:
                raise TransportError(f"cannot inspect exchange {exchange}: {exc}") from exc
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return found

    async def delete_queue(self, queue: str, *, if_unused: bool, if_empty: bool) -> Deletion:
        """Delete ``queue`` and report it: with ``if_unused``/``if_empty`` the broker refuses a queue that
        has consumers or messages (checked atomically there, so a queue that became busy since a passive
        check is left, with the broker's reason). A queue that does not exist is left as ``not found``.
        """
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(queue, passive=True)
            done = await channel.queue_delete(queue, if_unused=if_unused, if_empty=if_empty)
            return Deletion("queue", queue, True, messages=int(done.message_count or 0))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return Deletion("queue", queue, False, why="not found (deleted by someone else meanwhile)")
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            return Deletion("queue", queue, False, why=f"the broker refused: {_broker_reason(exc)}")
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"deleting queue {queue} failed: {exc}") from exc
        finally:
            self._declared.clear()
            with contextlib.suppress(Exception):
                await channel.close()

    async def delete_exchange(self, exchange: str, *, if_unused: bool) -> Deletion:
        """Delete ``exchange`` and report it: with ``if_unused`` the broker refuses one still bound to a
        queue (a queue fabric was not told about, a client's or an alert consumer's)."""
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(exchange, passive=True)
            await channel.exchange_delete(exchange, if_unused=if_unused)
            return Deletion("exchange", exchange, True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return Deletion("exchange", exchange, False, why="not found (deleted by someone else meanwhile)")
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            return Deletion(
                "exchange",
                exchange,
                False,
                why=f"still bound to a queue (one not named with -c, or a client's): {_broker_reason(exc)}",
            )
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"deleting exchange {exchange} failed: {exc}") from exc
        finally:
            self._declared.clear()
            with contextlib.suppress(Exception):
                await channel.close()

    async def queue_info(self, queue: str) -> QueueInfo | None:
        """Message and consumer counts of ``queue`` (passive declare), or None when it does not exist."""
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return QueueInfo(queue, result.message_count or 0, result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"cannot inspect queue {queue}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def queue_infos(self, queues: Iterable[str]) -> dict[str, QueueInfo | None]:
        """Message and consumer counts of several queues (passive declares on one channel); None for
        a queue that does not exist. A queue the broker cannot inspect now is left out."""
        connection, _ = self._require()
        found: dict[str, QueueInfo | None] = {}
        channel: AbstractChannel | None = None
        try:
            for queue in queues:
                if channel is None or channel.is_closed:
                    channel = await connection.channel(publisher_confirms=False)
                try:
                    declared = await channel.declare_queue(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    found[queue] = None
                    # The broker closed the channel: drop it (a robust channel would reopen itself).
                    with contextlib.suppress(Exception):
                        await channel.close()
                    channel = None
                    continue
                result = declared.declaration_result
                found[queue] = QueueInfo(queue, result.message_count or 0, result.consumer_count or 0)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, RuntimeError, OSError) as exc:
            raise TransportError(f"cannot inspect queues: {exc}") from exc
        finally:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()
        return found

    # -- publishing -------------------------------------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        content_type: str = "application/msgpack",
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        priority: int | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        expiration_s: float | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm. Concurrent calls pipeline their confirms.

        Raises:
            PublishError: the broker nacked the message, returned it as unroutable (``mandatory``), or
                did not confirm within the publish timeout.
            TransportError: the connection is down.
        """
        _, channel = self._require()
        # The properties go straight to aiormq: an aio_pika.Message (a locked object, validated field by
        # field) and an aio_pika.Exchange add nothing here but time on the hot path.
        properties = aiormq.spec.Basic.Properties(
            content_type=content_type,
            delivery_mode=2 if persistent else 1,
            headers=dict(headers) if headers else {},
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=priority or 0,
            expiration=None if expiration_s is None else str(int(expiration_s * 1000)),
        )
        if channel.is_closed:
            # Reconnecting: the robust connection reopens the channel; wait for it rather than fail a
            # publish that would go through a moment later.
            await self._wait_for_channel(channel)
        started = time.perf_counter()
        try:
            try:
                confirm = await self._basic_publish(
                    channel, exchange, routing_key, body, properties, mandatory
                )
            except aiormq.exceptions.ChannelInvalidStateError:
                # The channel closed before the message went out: once it is back, send it again.
                await self._wait_for_channel(channel)
                confirm = await self._basic_publish(
                    channel, exchange, routing_key, body, properties, mandatory
                )
        except aiormq.exceptions.PublishError as exc:
            raise PublishError(
                f"message to {exchange or '(default)'}/{routing_key} was returned as unroutable",
                exchange=exchange,
                routing_key=routing_key,
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishError(
                f"broker refused message to {exchange or '(default)'}/{routing_key}: {exc}",
                exchange=exchange,
                routing_key=routing_key,
            ) from exc
        except TimeoutError as exc:
            raise PublishError(
                f"no confirm for message to {exchange}/{routing_key} within {self._publish_timeout_s}s",
                exchange=exchange,
                routing_key=routing_key,
            ) from exc
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, RuntimeError, OSError) as exc:
            raise TransportError(f"publish to {exchange}/{routing_key} failed: {exc}") from exc
        if confirm is not None and not _is_ack(confirm):
            raise PublishError(
                f"broker nacked message to {exchange}/{routing_key}",
                exchange=exchange,
                routing_key=routing_key,
            )
        if self.on_confirm is not None:
            self.on_confirm(exchange, time.perf_counter() - started)

    async def _basic_publish(
        self,
        channel: AbstractChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        mandatory: bool,
    ) -> Any:
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        # wait=False: no wait for the frames to be written out. The broker's confirm, awaited here, comes
        # after the broker has the message, which says more than a flushed socket.
        return await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            timeout=self._publish_timeout_s,
            **_NO_WAIT,
        )

    async def publish_unconfirmed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        content_type: str = "application/msgpack",
    ) -> bool:
        """Best effort: send a transient message without waiting for (or asking for) the broker's confirm.

        For progress signals that the state store, not the broker, keeps the record of (the router's task
        notifications). Uses a channel of its own without publisher confirms, so the broker sends no ack
        frame back and nothing waits for one. Returns False, having sent nothing, while the connection
        is down or when the broker cannot take it; never raises a transport error.
        """
        self._require()
        channel = self._unconfirmed_channel
        if channel is None or channel.is_closed:
            return False
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=aiormq.spec.Basic.Properties(content_type=content_type, delivery_mode=1),
                mandatory=False,
                timeout=self._publish_timeout_s,
                **_NO_WAIT,
            )
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, RuntimeError, OSError) as exc:
            log.debug("unconfirmed publish to %s/%s dropped: %s", exchange, routing_key, exc)
            return False
        except TimeoutError:
            return False
        return True

    async def _wait_for_channel(self, channel: AbstractChannel) -> None:
        """Wait (up to the publish timeout) for a closed robust channel to be reopened."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_timeout_s
        while channel.is_closed and not self._closed:
            if loop.time() > deadline:
                raise TransportError(
                    f"the broker connection did not come back within {self._publish_timeout_s:g}s"
                )
            await asyncio.sleep(0.05)

    # -- consuming --------------------------------------------------------------------------------

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
                on_message = _guard_callback(queue, callback, self._handlers)
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
                deliveries.append(Delivery(message))
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
            tag = await declared.consume(_guard_callback(declared.name, callback, self._handlers))
        except aiormq.exceptions.AMQPError as exc:
            raise TransportError(f"cannot declare a reply queue: {exc}") from exc
        consumer = Consumer(declared, tag, channel)
        self._consumers.append(consumer)
        return consumer


class _CoalescingTransportFactory(aiormq.connection.TCPTransportFactory):
    """Plain TCP, with every frame written during one event loop iteration sent in one ``send``.

    aiormq writes each message (and each ack) to the socket as it comes, one system call apiece; under
    load that is a large share of a fabric process's time. Here a write is buffered and the buffer is
    handed to the transport once, at the end of the current iteration (at once past 256 KiB). Order is
    kept, and the buffer is flushed before any ``drain``, ``write_eof`` or ``close``, so a frame written
    just before closing still goes out.
    """

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await super().create(url, **kwargs)
        _coalesce_writes(writer)
        return reader, writer


#: A buffer of this many bytes is sent at once instead of at the end of the loop iteration.
_COALESCE_LIMIT = 256 * 1024


def _coalesce_writes(writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    transport = writer.transport
    pending: list[bytes] = []
    size = 0
    write, drain, write_eof, close = writer.write, writer.drain, writer.write_eof, writer.close

    def flush() -> None:
        nonlocal size
        if pending:
            data = b"".join(pending)
            pending.clear()
            size = 0
            if not transport.is_closing():
                write(data)

    def buffered_write(data: Any) -> None:
        nonlocal size
        if not pending:
            loop.call_soon(flush)
        pending.append(bytes(data))
        size += len(data)
        if size >= _COALESCE_LIMIT:
            flush()

    async def flushing_drain() -> None:
        flush()
        await drain()

    def flushing_write_eof() -> None:
        flush()
        write_eof()

    def flushing_close() -> None:
        flush()
        close()

    writer.write = buffered_write  # type: ignore[method-assign]
    writer.drain = flushing_drain  # type: ignore[method-assign]
    writer.write_eof = flushing_write_eof  # type: ignore[method-assign]
    writer.close = flushing_close  # type: ignore[method-assign]


class _RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, writing through :class:`_CoalescingTransportFactory` (plain amqp://;
    amqps:// keeps aiormq's TLS transport). The factory is used again on every reconnect."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        if self.url.scheme == "amqp" and COALESCE_WRITES:
            self.kwargs["transport_factory"] = _CoalescingTransportFactory()


#: Set to False to write every frame at once (for A/B measurements).
COALESCE_WRITES = True


def _guard_callback(
    queue: str, callback: DeliveryCallback, handlers: set[asyncio.Task[None]]
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """Wrap ``callback`` for aio-pika: errors are logged and the message requeued, and the callback runs
    in a task of its own.

    aiormq runs each delivery's callback in a task of the channel and cancels them all when the channel
    closes, as RabbitMQ closes it when a delivery stays unacked past ``consumer_timeout``: every task
    running on the channel would be cancelled halfway and counted as lost. Run apart, a callback goes on
    to the end and settles its delivery (a settle on the dead channel is logged, and the broker delivers
    the message again; the worker adopts that copy). :meth:`AmqpConnection.close` cancels what is left.
    """

    async def guarded(delivery: Delivery) -> None:
        try:
            await callback(delivery)
        except Exception:
            # Callbacks settle their own deliveries and guard their own errors; reaching here is a bug.
            # Requeueing keeps the message; the pause keeps a persistent bug from spinning hot.
            log.exception("consumer of %s crashed on message %s; requeueing it", queue, delivery.message_id)
            await asyncio.sleep(1.0)
            await delivery.nack(requeue=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        handler = asyncio.create_task(guarded(Delivery(message)))
        handlers.add(handler)
        handler.add_done_callback(handlers.discard)
        # The channel's task waits for the handler, so the channel's prefetch accounting is unchanged; if
        # the channel closes, only this wait is cancelled.
        await asyncio.shield(handler)

    return on_message


def _consumer_arguments(priority: int | None) -> dict[str, Any] | None:
    return None if priority is None else {"x-priority": priority}


def _is_ack(confirm: Any) -> bool:
    return type(confirm).__name__ == "Ack" or not type(confirm).__name__.startswith("N")


def _item_name(item: ExchangeSpec | QueueSpec | BindingSpec) -> str:
    if isinstance(item, BindingSpec):
        return f"binding {item.exchange} -> {item.queue} ({item.routing_key})"
    return item.name


def _precondition_text(exc: BaseException) -> str:
    text = str(exc)
    return f"exists with other arguments than expected ({text}); delete it or fix the settings"


def _broker_reason(exc: BaseException) -> str:
    """The broker's words from a channel error (``PRECONDITION_FAILED - queue 'x' ... not empty``)."""
    reply = exc.args[0] if exc.args else None
    return str(getattr(reply, "reply_text", None) or exc)


class _NoTransportErrorLine(logging.Filter):
    """Drops aiormq's "error when creating transport" line: aiormq raises that error right after logging
    it, and fabric reports it once (a TransportError on connect; aio-pika's warning on a reconnect)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_NoTransportErrorLine())


async def _connect_or_explain(url: str, name: str, timeout_s: float) -> AbstractRobustConnection:
    """``aio_pika.connect_robust``; when it is not done after ``_PROBE_AFTER_S``, the server is asked for
    its greeting on a connection of its own, and one that gives none within :data:`GREETING_TIMEOUT_S`
    fails the connect (a web server or Redis on the port would otherwise fail it after ``timeout_s``,
    with an empty reason)."""
    connection = _RobustConnection(
        aio_pika.connection.make_url(url), client_properties={"connection_name": name}
    )
    connecting = asyncio.ensure_future(connection.connect(timeout=timeout_s))
    try:
        done, _ = await asyncio.wait({connecting}, timeout=min(_PROBE_AFTER_S, timeout_s))
        if not done and urlsplit(url).scheme.lower() == "amqp" and await _greets_as_amqp(url) is False:
            raise TimeoutError(
                f"no AMQP greeting within {GREETING_TIMEOUT_S:g}s: this is not an AMQP server "
                "(check the host and port of FABRIC_AMQP_URL; RabbitMQ listens on 5672)"
            )
        await connecting
        return connection
    except BaseException:
        # A robust connection that never opened would keep trying in the background: stop it.
        connecting.cancel()
        with contextlib.suppress(Exception):
            await connection.close()
        with contextlib.suppress(BaseException):
            await connecting
        raise


async def _greets_as_amqp(url: str) -> bool | None:
    """Whether the server at ``url`` answers the AMQP protocol header with a method frame within
    :data:`GREETING_TIMEOUT_S`; None when it cannot be reached (the connect reports that)."""
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "localhost", parts.port or 5672), GREETING_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        first = await asyncio.wait_for(reader.read(1), GREETING_TIMEOUT_S)
        # An AMQP broker answers with Connection.Start: a method frame (type 1) on channel 0.
        return first == b"\x01"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _connect_failure(exc: BaseException, url: str) -> str:
    """What went wrong connecting, in words: aiormq says ``Expected one of ['Connection.OpenOk'], got
    <Connection.Close ...>`` when the broker refuses the virtual host."""
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.AMQPError) and "Connection.OpenOk" in text and "Close" in text:
        parts = urlsplit(url)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        user = unquote(parts.username or "guest")
        return (
            f"the broker refused virtual host {vhost!r} for user {user!r} (the vhost does not exist, or the "
            "user has no permission on it; the vhost is the path of FABRIC_AMQP_URL)"
        )
    return text or type(exc).__name__


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
