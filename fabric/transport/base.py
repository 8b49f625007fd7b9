"""The transport seam: what the router, the worker, the client and the CLI ask of a message broker.

Two implementations ship: :class:`fabric.transport.amqp.AmqpConnection` over RabbitMQ (aio-pika), and
:class:`fabric.testing.MemoryBroker`, in process, for tests that should not need a broker. One contract
suite (``tests/contract/test_transport.py``) runs against both.

The vocabulary is the broker's (AMQP 0-9-1): exchanges route messages to queues through bindings,
publishes are confirmed, deliveries are acked, nacked or rejected. Errors are those of
:mod:`fabric.errors`, never a client library's::

    TransportError          the connection, or an operation on it, failed
     └── PublishError       a publish was nacked, returned, or not confirmed in time
          └── Unroutable    a mandatory publish came back: no queue is bound for its routing key
    TopologyMismatch        a queue is missing (passive declare, consume) or exists with other arguments
    NotConnectedError       used before ``connect()`` / ``async with``, or after ``close()``

Example:
    >>> async def send(transport: Transport, body: bytes) -> None:
    ...     await transport.declare(topology)
    ...     await transport.publish("ns.tasks", "echo", body, priority=5)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fabric.errors import NotConnectedError, PublishError, TopologyMismatch, TransportError, Unroutable
from fabric.topology.spec import Topology
from fabric.topology.teardown import Deletion

__all__ = [
    "DEFAULT_EXCHANGE",
    "Admin",
    "Consumer",
    "Consuming",
    "Delivery",
    "DeliveryCallback",
    "NotConnectedError",
    "PublishError",
    "Publisher",
    "QueueInfo",
    "TopologyMismatch",
    "Transport",
    "TransportError",
    "Unroutable",
]

#: Routing through the default exchange sends straight to the queue named by the routing key.
DEFAULT_EXCHANGE = ""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What a passive declare tells about a queue: messages ready (not the unacked ones) and consumers."""

    name: str
    messages: int
    consumers: int


@runtime_checkable
class Delivery(Protocol):
    """One message received from a queue; settle it exactly once with :meth:`ack`, :meth:`nack` or
    :meth:`reject` (a second settle is ignored). Settling after the channel died is logged, not raised:
    the broker redelivers the message, with :attr:`redelivered` set."""

    @property
    def settled(self) -> bool: ...
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, Any]: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None:
        """Give the message back (``requeue``) or dead-letter it (to the queue's dead-letter exchange, if
        it has one; else it is dropped)."""

    async def reject(self, *, requeue: bool = False) -> None: ...


#: Called once per delivery; it must settle the delivery. It runs concurrently up to the prefetch.
DeliveryCallback = Callable[[Delivery], Awaitable[None]]


@runtime_checkable
class Consumer(Protocol):
    """A running consumer of one queue. :meth:`cancel` stops new deliveries; in-flight ones stay to be
    settled. ``priority`` is the consumer priority: a queue's messages go to its highest-priority
    consumers that have room first."""

    queue_name: str
    priority: int | None
    active: bool
    #: Times this consumer was subscribed.
    subscriptions: int

    @property
    def healthy(self) -> bool:
        """True while the broker delivers to this consumer (subscribed on an open channel)."""

    async def resume(self) -> None:
        """Subscribe again after :meth:`cancel`."""

    async def set_priority(self, priority: int) -> None:
        """Consume with consumer priority ``priority`` from now on; nothing is lost or delivered twice.

        Raises:
            TransportError: the broker refused, or the channel is down (try again later).
        """

    async def resubscribe(self) -> None:
        """Subscribe again after the broker cancelled this consumer (its queue was deleted)."""

    async def get_one(self) -> Delivery | None:
        """Take one message (basic.get) from the queue, or None when it is empty.

        Raises:
            TransportError: the broker refused or the channel is down.
        """

    async def bind(self, exchange: str, routing_key: str) -> None: ...
    async def cancel(self) -> None: ...
    async def close(self) -> None: ...


class Publisher(Protocol):
    """Publishing with confirms (and mandatory routing), or best effort."""

    #: Called with the exchange and the seconds from publish to the broker's confirm.
    on_confirm: Callable[[str, float], None] | None

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
        """Publish and wait for the broker's confirm.

        Raises:
            Unroutable: ``mandatory`` and no queue is bound for ``routing_key``.
            PublishError: the broker nacked the message or did not confirm it in time.
            TransportError: the connection is down.
        """

    async def publish_unconfirmed(
        self, exchange: str, routing_key: str, body: bytes, *, content_type: str = "application/msgpack"
    ) -> bool:
        """Best effort, transient, not confirmed; False (nothing sent) when it cannot go now. Never raises
        a transport error."""


class Consuming(Protocol):
    """Consumers: on declared queues, on an exclusive reply queue, and a look at a queue's messages."""

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        """Consume ``queue`` with at most ``prefetch`` unacked deliveries.

        Raises:
            TopologyMismatch: the queue does not exist.
        """

    async def consume_many(
        self,
        callbacks: Mapping[str, DeliveryCallback],
        *,
        prefetch: int,
        priorities: Mapping[str, int] | None = None,
        channel_wide: bool = False,
    ) -> Sequence[Consumer]:
        """Consume several queues sharing one ``prefetch`` limit (one limit for one queue too when
        ``channel_wide``); ``priorities`` gives the consumer priority per queue."""

    def browse(self, queue: str, *, limit: int) -> AbstractAsyncContextManager[list[Delivery]]:
        """Up to ``limit`` messages of ``queue``; those not acked in the block go back at their place."""

    async def reply_queue(self, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        """Declare an exclusive, server-named queue (gone with the connection) and consume it."""


class Admin(Protocol):
    """Topology: declare (idempotent, cached), check, inspect and delete."""

    async def declare(self, topology: Topology) -> None:
        """Declare every exchange, queue and binding of ``topology``.

        Raises:
            TopologyMismatch: something exists with other arguments.
        """

    async def forget(self, topology: Topology) -> None:
        """Drop ``topology`` from the declare cache, so the next :meth:`declare` asks the broker again."""

    async def check(self, topology: Topology) -> list[str]:
        """The problems of ``topology`` on the broker (missing, other arguments); creates nothing."""

    async def delete(self, topology: Topology) -> None: ...
    async def exchanges_exist(self, exchanges: Iterable[str]) -> dict[str, bool]: ...
    async def delete_queue(self, queue: str, *, if_unused: bool, if_empty: bool) -> Deletion: ...
    async def delete_exchange(self, exchange: str, *, if_unused: bool) -> Deletion: ...

    async def queue_info(self, queue: str) -> QueueInfo | None:
        """Counts of ``queue`` (a passive declare), or None when it does not exist."""

    async def queue_infos(self, queues: Iterable[str]) -> dict[str, QueueInfo | None]: ...


class Transport(Publisher, Consuming, Admin, Protocol):
    """A broker connection: publish, consume and administer, with a lifecycle.

    ``on_lost`` callbacks run when the connection is lost (not when closed on purpose), ``on_restored``
    ones when it is back with its consumers restored.
    """

    on_lost: list[Callable[[], None]]
    on_restored: list[Callable[[], None]]

    @property
    def connected(self) -> bool: ...

    async def connect(self, timeout_s: float = 15.0) -> None:
        """Raises:
        TransportError: the broker cannot be reached or refused the login.
        NotConnectedError: already connected (a connection is opened once)."""

    async def close(self) -> None: ...
    async def __aenter__(self) -> Transport: ...
    async def __aexit__(self, *exc: object) -> None: ...
