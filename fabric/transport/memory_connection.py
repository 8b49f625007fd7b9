"""A connection to the in-memory broker of :mod:`fabric.transport.memory`: a
:class:`fabric.transport.base.Transport` with the same errors, caches and settling rules as the AMQP
adapter, for tests that should not need RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fabric.errors import NotConnectedError, TopologyMismatch, TransportError, Unroutable
from fabric.topology.spec import BindingSpec, ExchangeSpec, QueueSpec, Topology
from fabric.topology.teardown import Deletion
from fabric.transport.base import Delivery, DeliveryCallback, QueueInfo, Transport
from fabric.transport.memory import Credit, Message
from fabric.transport.memory_consumer import MemoryConsumer, MemoryDelivery

if TYPE_CHECKING:
    from fabric.transport.memory import MemoryBroker

log = logging.getLogger("fabric.transport")


class MemoryConnection:
    """A connection to a :class:`~fabric.transport.memory.MemoryBroker` (a
    :class:`fabric.transport.base.Transport`)."""

    def __init__(
        self, broker: MemoryBroker, *, name: str = "fabric", publish_timeout_s: float = 30.0
    ) -> None:
        self.broker = broker
        self.name = name
        self._publish_timeout_s = publish_timeout_s
        #: Set while the connection is up (publishes during an outage wait for it, as over AMQP).
        self._up = asyncio.Event()
        self.on_confirm: Callable[[str, float], None] | None = None
        self.on_lost: list[Callable[[], None]] = []
        self.on_restored: list[Callable[[], None]] = []
        self._state = "new"
        self._declared: set[ExchangeSpec | QueueSpec | BindingSpec] = set()
        self._consumers: list[MemoryConsumer] = []
        self._unacked: set[MemoryDelivery] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> MemoryConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._state == "open"

    async def connect(self, timeout_s: float = 15.0) -> None:
        if self._state != "new":
            raise NotConnectedError("this MemoryConnection is already connected; create a new one")
        self._state = "open"
        self._up.set()

    def lose(self) -> None:
        """A network fault (see :meth:`MemoryBroker.cut`): unacked deliveries go back to their queues,
        redelivered; consumers stop getting messages; ``on_lost`` callbacks run."""
        if self._state != "open":
            return
        self._state = "lost"
        self._up.clear()
        self._give_back()
        for callback in self.on_lost:
            callback()

    def restore(self) -> None:
        """Back after :meth:`lose`, with its consumers subscribed again; ``on_restored`` callbacks run."""
        if self._state != "lost":
            return
        self._state = "open"
        self._up.set()
        for consumer in self._consumers:
            if consumer.active:
                self.broker.pump(self.broker.queues.get(consumer.queue_name) or consumer.queue)
        for callback in self.on_restored:
            callback()

    def _give_back(self) -> None:
        # As RabbitMQ does when a channel closes: unacked deliveries go back, marked redelivered.
        for delivery in sorted(self._unacked, key=lambda d: d.seq):
            delivery.outcome(requeue=True, dead=False)
        self._unacked.clear()

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        self._up.set()
        for consumer in self._consumers:
            await consumer.close()
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        self._give_back()
        for queue in [q for q in self.broker.queues.values() if q.owner is self]:
            self.broker.delete_queue(queue.name)

    def _require(self) -> MemoryBroker:
        if self._state not in ("open", "lost"):
            raise NotConnectedError("MemoryConnection is not connected: use 'async with broker.connection()'")
        return self.broker

    def holds(self, delivery: MemoryDelivery) -> bool:
        return delivery in self._unacked

    def release(self, delivery: MemoryDelivery) -> None:
        self._unacked.discard(delivery)

    def run(self, queue: str, callback: DeliveryCallback, delivery: MemoryDelivery) -> None:
        """Run ``callback`` on ``delivery`` in a task of its own, as the AMQP adapter does."""
        self._unacked.add(delivery)

        async def guarded() -> None:
            try:
                await callback(delivery)
            except Exception:
                log.exception(
                    "consumer of %s crashed on message %s; requeueing it", queue, delivery.message_id
                )
                await asyncio.sleep(1.0)
                await delivery.nack(requeue=True)

        handler = asyncio.get_running_loop().create_task(guarded())
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    def get(self, queue_name: str) -> MemoryDelivery | None:
        queue = self.broker.queue(queue_name)
        entry = queue.take()
        if entry is None:
            return None
        delivery = MemoryDelivery(entry, queue, self, None)
        self._unacked.add(delivery)
        return delivery

    # -- publishing ---------------------------------------------------------------------------------

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
        broker = self._require()
        if self._state == "lost":
            # Reconnecting: wait for the connection rather than fail a publish that would go through
            # a moment later.
            try:
                await asyncio.wait_for(self._up.wait(), self._publish_timeout_s)
            except TimeoutError:
                raise TransportError(
                    f"the broker connection did not come back within {self._publish_timeout_s:g}s"
                ) from None
            self._require()
        message = Message(
            body=bytes(body),
            routing_key=routing_key,
            headers=dict(headers or {}),
            exchange=exchange,
            content_type=content_type,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=priority or 0,
            expiration_ms=None if expiration_s is None else int(expiration_s * 1000),
        )
        try:
            queues = broker.route(exchange, message)
        except TransportError as exc:
            raise TransportError(f"publish to {exchange}/{routing_key} failed: {exc}") from exc
        if not queues and mandatory:
            raise Unroutable(
                f"message to {exchange or '(default)'}/{routing_key} was returned as unroutable",
                exchange=exchange,
                routing_key=routing_key,
            )
        broker.published += 1
        broker.enqueue(queues, message)
        if self.on_confirm is not None:
            self.on_confirm(exchange, 0.0)

    async def publish_unconfirmed(
        self, exchange: str, routing_key: str, body: bytes, *, content_type: str = "application/msgpack"
    ) -> bool:
        self._require()
        if self._state != "open":
            return False
        try:
            await self.publish(
                exchange, routing_key, body, content_type=content_type, persistent=False, mandatory=False
            )
        except NotConnectedError:
            raise
        except TransportError:
            return False
        return True

    # -- consuming ----------------------------------------------------------------------------------

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> MemoryConsumer:
        consumers = await self.consume_many({queue: callback}, prefetch=prefetch)
        return consumers[0]

    async def consume_many(
        self,
        callbacks: Mapping[str, DeliveryCallback],
        *,
        prefetch: int,
        priorities: Mapping[str, int] | None = None,
        channel_wide: bool = False,
    ) -> list[MemoryConsumer]:
        broker = self._require()
        shared = Credit(prefetch) if channel_wide or len(callbacks) > 1 else None
        consumers = []
        for name, callback in callbacks.items():
            queue = broker.queue(name)
            consumer = MemoryConsumer(
                self, queue, callback, shared or Credit(prefetch), priority=(priorities or {}).get(name)
            )
            queue.consumers.append(consumer)
            consumers.append(consumer)
        self._consumers.extend(consumers)
        for consumer in consumers:
            broker.pump(broker.queue(consumer.queue_name))
        return consumers

    @contextlib.asynccontextmanager
    async def browse(self, queue: str, *, limit: int) -> AsyncIterator[list[Delivery]]:
        self._require()
        deliveries: list[Delivery] = []
        try:
            while len(deliveries) < limit:
                taken = self.get(queue)
                if taken is None:
                    break
                deliveries.append(taken)
            yield deliveries
        finally:
            for delivery in deliveries:
                await delivery.nack(requeue=True)

    async def reply_queue(self, callback: DeliveryCallback, *, prefetch: int) -> MemoryConsumer:
        queue = self._require().declare_queue("", {}, owner=self)
        return await self.consume(queue.name, callback, prefetch=prefetch)

    # -- topology -----------------------------------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        broker = self._require()
        items: list[ExchangeSpec | QueueSpec | BindingSpec] = [
            *topology.exchanges,
            *topology.queues,
            *topology.bindings,
        ]
        for item in items:
            if item in self._declared:
                continue
            if isinstance(item, ExchangeSpec):
                broker.declare_exchange(item.name, item.type)
            elif isinstance(item, QueueSpec):
                broker.declare_queue(item.name, item.arguments_dict)
            else:
                broker.bind(item.queue, item.exchange, item.routing_key, item.arguments)
            self._declared.add(item)

    async def forget(self, topology: Topology) -> None:
        for item in (*topology.exchanges, *topology.queues, *topology.bindings):
            self._declared.discard(item)

    async def check(self, topology: Topology) -> list[str]:
        broker = self._require()
        problems = []
        for exchange in topology.exchanges:
            if exchange.name not in broker.exchanges:
                problems.append(f"{exchange.name}: missing")
            elif broker.exchanges[exchange.name] != exchange.type:
                problems.append(f"{exchange.name}: exists with other arguments than expected (type)")
        for queue in topology.queues:
            if queue.name not in broker.queues:
                problems.append(f"{queue.name}: missing")
                continue
            try:
                broker.declare_queue(queue.name, queue.arguments_dict)
            except TopologyMismatch as exc:
                problems.append(f"{queue.name}: {exc.detail}")
        return problems

    async def delete(self, topology: Topology) -> None:
        broker = self._require()
        for queue in topology.queues:
            if queue.name in broker.queues:
                broker.delete_queue(queue.name)
        for exchange in topology.exchanges:
            if exchange.name in broker.exchanges:
                broker.delete_exchange(exchange.name)
        self._declared.clear()

    async def exchanges_exist(self, exchanges: Iterable[str]) -> dict[str, bool]:
        broker = self._require()
        return {name: name in broker.exchanges for name in exchanges}

    async def delete_queue(self, queue: str, *, if_unused: bool, if_empty: bool) -> Deletion:
        broker = self._require()
        self._declared.clear()
        found = broker.queues.get(queue)
        if found is None:
            return Deletion("queue", queue, False, why="not found (deleted by someone else meanwhile)")
        refusal = ""
        if if_unused and found.subscribed():
            refusal = f"PRECONDITION_FAILED - queue '{queue}' in vhost '/' in use"
        elif if_empty and found.ready:
            refusal = f"PRECONDITION_FAILED - queue '{queue}' in vhost '/' not empty"
        if refusal:
            return Deletion("queue", queue, False, why=f"the broker refused: {refusal}")
        return Deletion("queue", queue, True, messages=broker.delete_queue(queue))

    async def delete_exchange(self, exchange: str, *, if_unused: bool) -> Deletion:
        broker = self._require()
        self._declared.clear()
        if exchange not in broker.exchanges:
            return Deletion("exchange", exchange, False, why="not found (deleted by someone else meanwhile)")
        if if_unused and any(b.exchange == exchange for b in broker.bindings):
            return Deletion(
                "exchange",
                exchange,
                False,
                why="still bound to a queue (one not named with -c, or a client's): "
                f"PRECONDITION_FAILED - exchange '{exchange}' in vhost '/' in use",
            )
        broker.delete_exchange(exchange)
        return Deletion("exchange", exchange, True)

    async def queue_info(self, queue: str) -> QueueInfo | None:
        found = self._require().queues.get(queue)
        if found is None:
            return None
        found.expire()
        return QueueInfo(queue, len(found.ready), len(found.subscribed()))

    async def queue_infos(self, queues: Iterable[str]) -> dict[str, QueueInfo | None]:
        return {queue: await self.queue_info(queue) for queue in queues}


if TYPE_CHECKING:
    _is_a_transport: type[Transport] = MemoryConnection
