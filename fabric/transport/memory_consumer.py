"""Deliveries and consumers of the in-memory broker (:mod:`fabric.transport.memory`), with the settling
rules of the AMQP adapter: a second settle is ignored, a settle after the connection closed is logged
(the broker has the message back already), and a requeued message goes back at its place, redelivered."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fabric.errors import TransportError
from fabric.transport.base import Delivery, DeliveryCallback
from fabric.transport.memory import Credit, Entry, Queue

if TYPE_CHECKING:
    from fabric.transport.memory_connection import MemoryConnection

log = logging.getLogger("fabric.transport")


class MemoryDelivery:
    """A message handed out by a queue; settling it tells the queue (and frees the consumer's credit)."""

    def __init__(
        self, entry: Entry, queue: Queue, connection: MemoryConnection, credit: Credit | None
    ) -> None:
        self._entry = entry
        #: Arrival number in its queue (a requeue puts it back at its place).
        self.seq = entry.seq
        self._message = entry.message
        self._queue = queue
        self._connection = connection
        self._credit = credit
        self.settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

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
        return self._message.priority

    @property
    def redelivered(self) -> bool:
        return self._message.redelivered

    @property
    def routing_key(self) -> str:
        return self._message.routing_key

    @property
    def user_id(self) -> str | None:
        return None

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.headers)

    async def ack(self) -> None:
        self._settle(requeue=False, dead=False)

    async def nack(self, *, requeue: bool = True) -> None:
        self._settle(requeue=requeue, dead=not requeue)

    async def reject(self, *, requeue: bool = False) -> None:
        self._settle(requeue=requeue, dead=not requeue)

    def _settle(self, *, requeue: bool, dead: bool) -> None:
        if self.settled:
            return
        self.settled = True
        if not self._connection.holds(self):
            # The connection closed and the broker took the message back already (as RabbitMQ does).
            log.warning("could not settle message %s: its connection is closed", self.message_id)
            return
        self._connection.release(self)
        self.outcome(requeue=requeue, dead=dead)

    def outcome(self, *, requeue: bool, dead: bool) -> None:
        """Carry out the settling on the queue: requeue at its place, dead-letter, or forget."""
        broker = self._queue.broker
        if self._credit is not None:
            self._credit.unacked -= 1
        if self._queue.deleted:
            return
        if requeue:
            self._message.redelivered = True
            self._queue.put(self._message, seq=self._entry.seq, expires_at=self._entry.expires_at)
        elif dead:
            broker.dead_letter(self._queue, self._message, "rejected")
        broker.pump(self._queue)
        if self._credit is not None:
            broker.pump_all(self._credit)


class MemoryConsumer:
    """A consumer of one queue (see :class:`fabric.transport.base.Consumer`)."""

    def __init__(
        self,
        connection: MemoryConnection,
        queue: Queue,
        callback: DeliveryCallback,
        credit: Credit,
        *,
        priority: int | None = None,
    ) -> None:
        self.queue_name = queue.name
        self.priority = priority
        self.active = True
        self.subscriptions = 1
        self.credit = credit
        self._connection = connection
        self._queue = queue
        self._callback = callback
        self._cancelled_by_broker = False

    @property
    def closed(self) -> bool:
        """True while its connection is not up (lost, or closed): the queue skips this consumer."""
        return not self._connection.connected

    @property
    def queue(self) -> Queue:
        return self._queue

    @property
    def healthy(self) -> bool:
        return self.active and not self.closed and not self._cancelled_by_broker

    def cancelled_by_broker(self) -> None:
        """The queue was deleted: the broker forgets this consumer (it stays :attr:`active`, unhealthy)."""
        self._cancelled_by_broker = True

    def deliver(self, entry: Entry) -> None:
        self.credit.unacked += 1
        delivery = MemoryDelivery(entry, self._queue, self._connection, self.credit)
        self._connection.run(self._queue.name, self._callback, delivery)

    def _subscribe(self) -> None:
        broker = self._queue.broker
        queue = broker.queues.get(self.queue_name)
        if queue is None:
            raise TransportError(f"cannot consume {self.queue_name} again: NOT_FOUND - no queue")
        if self in self._queue.consumers:
            self._queue.consumers.remove(self)
        self._queue = queue
        queue.consumers.append(self)
        self._cancelled_by_broker = False
        self.active = True
        self.subscriptions += 1
        broker.pump(queue)

    async def resume(self) -> None:
        if not self.active:
            self._subscribe()

    async def set_priority(self, priority: int) -> None:
        if priority == self.priority:
            return
        if self.active and self.closed:
            raise TransportError(f"cannot change the priority of {self.queue_name}: its channel is down")
        self.priority = priority
        if self.active:
            self._subscribe()

    async def resubscribe(self) -> None:
        self.active = False
        self._subscribe()

    async def get_one(self) -> Delivery | None:
        if self.closed:
            raise TransportError(f"cannot get from {self.queue_name}: the connection is closed")
        return self._connection.get(self.queue_name)

    async def bind(self, exchange: str, routing_key: str) -> None:
        self._queue.broker.bind(self.queue_name, exchange, routing_key)

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        with contextlib.suppress(ValueError):
            self._queue.consumers.remove(self)

    async def close(self) -> None:
        await self.cancel()
