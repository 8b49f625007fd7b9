"""An AMQP 0-9-1 broker in process: the exchanges, queues and bindings fabric's topology uses, with the
RabbitMQ behaviour fabric relies on (see ``tests/contract/test_transport.py``, run against both).

It keeps to what RabbitMQ does where fabric depends on it: direct, topic, fanout and headers routing
(and the default exchange), mandatory publishes coming back, ``x-max-priority``, per-consumer and
channel-wide prefetch, consumer priority (``x-priority``), single active consumer, requeue with the
redelivered flag, dead-lettering (rejected, or expired through ``x-message-ttl`` or a per-message
expiration) keeping the routing key, ``x-max-length`` dropping from the head, exclusive server-named
queues, and passive declares. It does not persist anything, and has no virtual hosts or permissions.

Connections to it are :class:`fabric.transport.memory_connection.MemoryConnection`\\ s, from
:meth:`MemoryBroker.connection`. Everything runs on the event loop of the caller; no threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fabric.errors import TopologyMismatch, TransportError
from fabric.topology.spec import ExchangeType

if TYPE_CHECKING:
    from fabric.transport.memory_connection import MemoryConnection
    from fabric.transport.memory_consumer import MemoryConsumer

#: Argument keys RabbitMQ compares when a queue is declared again (others are not checked).
_CHECKED_ARGUMENTS = (
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-priority",
    "x-message-ttl",
    "x-queue-type",
    "x-single-active-consumer",
)


@dataclass
class Message:
    """A message as the broker holds it."""

    body: bytes
    routing_key: str
    headers: dict[str, Any]
    exchange: str = ""
    content_type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int = 0
    expiration_ms: int | None = None
    redelivered: bool = False


@dataclass(order=True)
class Entry:
    """A message in one queue: ordered by priority (highest first), then by arrival; a requeued
    message keeps its arrival number, so it goes back at its place."""

    rank: int
    seq: int
    message: Message = field(compare=False)
    expires_at: float | None = field(default=None, compare=False)


@dataclass
class Credit:
    """A prefetch limit and the unacked deliveries counted against it (one consumer's, or a channel's)."""

    prefetch: int
    unacked: int = 0

    @property
    def room(self) -> bool:
        return self.prefetch <= 0 or self.unacked < self.prefetch


class Queue:
    """One queue: its ready messages, in delivery order, and its consumers in subscription order."""

    def __init__(self, broker: MemoryBroker, name: str, arguments: dict[str, Any], owner: object) -> None:
        self.broker = broker
        self.name = name
        self.arguments = arguments
        #: The connection of an exclusive queue (deleted with it), else None.
        self.owner = owner
        self.ready: list[Entry] = []
        self.consumers: list[MemoryConsumer] = []
        self.deleted = False
        self._turn = 0
        self._timer: asyncio.TimerHandle | None = None
        #: When the next ready message expires (the timer's time), if any may.
        self._due: float | None = None

    @property
    def max_priority(self) -> int:
        return int(self.arguments.get("x-max-priority", 0))

    def put(self, message: Message, *, seq: int | None = None, expires_at: float | None = None) -> None:
        """Enqueue ``message`` (a requeue passes its old ``seq`` and expiry)."""
        rank = -min(message.priority, self.max_priority) if self.max_priority else 0
        if seq is None:
            seq = next(self.broker.seq)
            expires_at = self._expiry(message)
        heapq.heappush(self.ready, Entry(rank, seq, message, expires_at))
        limit = self.arguments.get("x-max-length")
        while limit is not None and len(self.ready) > int(limit):
            # RabbitMQ's default overflow (drop-head): the oldest message makes room.
            self.broker.dead_letter(self, heapq.heappop(self.ready).message, "maxlen")
        if expires_at is not None and (self._due is None or expires_at < self._due):
            self._arm(expires_at)

    def take(self) -> Entry | None:
        if self._due is not None and self._due <= asyncio.get_running_loop().time():
            self.expire()
        return heapq.heappop(self.ready) if self.ready else None

    def _expiry(self, message: Message) -> float | None:
        ttls = [int(t) for t in (self.arguments.get("x-message-ttl"), message.expiration_ms) if t is not None]
        return asyncio.get_running_loop().time() + min(ttls) / 1000 if ttls else None

    def _arm(self, due: float | None) -> None:
        """Run :meth:`expire` at ``due`` (None: no message can expire)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = due
        if due is not None and not self.deleted:
            self._timer = asyncio.get_running_loop().call_at(due, self.expire)

    def expire(self) -> None:
        """Dead-letter the ready messages whose time is up, and wait for the next one."""
        now = asyncio.get_running_loop().time()
        expired = [e for e in self.ready if e.expires_at is not None and e.expires_at <= now]
        if expired:
            gone = {id(e) for e in expired}
            self.ready = [e for e in self.ready if id(e) not in gone]
            heapq.heapify(self.ready)
            for entry in sorted(expired):
                self.broker.dead_letter(self, entry.message, "expired")
        expiries = [e.expires_at for e in self.ready if e.expires_at is not None]
        self._arm(min(expiries) if expiries else None)

    def subscribed(self) -> list[MemoryConsumer]:
        return [c for c in self.consumers if c.active and not c.closed]

    def next_consumer(self) -> MemoryConsumer | None:
        """Who gets the next message: the single active consumer, or else the highest-priority consumers
        with room, in turn."""
        consumers = self.subscribed()
        if self.arguments.get("x-single-active-consumer"):
            consumers = consumers[:1]
        with_room = [c for c in consumers if c.credit.room]
        if not with_room:
            return None
        top = max(c.priority or 0 for c in with_room)
        best = [c for c in with_room if (c.priority or 0) == top]
        self._turn += 1
        return best[self._turn % len(best)]

    def close(self) -> None:
        self.deleted = True
        if self._timer is not None:
            self._timer.cancel()


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str
    arguments: tuple[tuple[str, Any], ...] = ()


class MemoryBroker:
    """The broker: exchanges, queues, bindings. Open connections to it with :meth:`connection`.

    Example:
        >>> broker = MemoryBroker()
        >>> async with broker.connection(name="router") as transport:
        ...     await transport.declare(spec.build("ns", ["echo"]))
        ...     await transport.publish("ns.tasks", "echo", b"body")
    """

    def __init__(self) -> None:
        self.exchanges: dict[str, ExchangeType] = {}
        self.queues: dict[str, Queue] = {}
        self.bindings: set[Binding] = set()
        self.seq = itertools.count()
        #: Messages published (confirmed or not), for tests that count traffic.
        self.published = 0

    def connection(self, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> MemoryConnection:
        """A new, not yet connected, connection (a :class:`fabric.transport.base.Transport`)."""
        from fabric.transport.memory_connection import MemoryConnection

        return MemoryConnection(self, name=name, publish_timeout_s=publish_timeout_s)

    def cut(self, connection: MemoryConnection, *, down_s: float = 0.05) -> None:
        """A network fault on ``connection``: it is lost at once (its unacked deliveries go back to their
        queues, redelivered; ``on_lost`` runs) and restored after ``down_s`` with its consumers (then
        ``on_restored`` runs), as aio-pika's robust connection reconnects."""
        connection.lose()
        asyncio.get_running_loop().call_later(down_s, connection.restore)

    # -- topology -----------------------------------------------------------------------------------

    def declare_exchange(self, name: str, kind: ExchangeType) -> None:
        existing = self.exchanges.setdefault(name, kind)
        if existing != kind:
            raise TopologyMismatch(name, f"exists as a {existing} exchange, not {kind}; delete it or fix it")

    def declare_queue(self, name: str, arguments: dict[str, Any], *, owner: object = None) -> Queue:
        queue = self.queues.get(name) if name else None
        if queue is None:
            queue = Queue(self, name or f"amq.gen-{uuid.uuid4().hex}", arguments, owner)
            self.queues[queue.name] = queue
            return queue
        ours = {k: queue.arguments.get(k) for k in _CHECKED_ARGUMENTS}
        theirs = {k: arguments.get(k) for k in _CHECKED_ARGUMENTS}
        if ours != theirs:
            differ = sorted(k for k in _CHECKED_ARGUMENTS if ours[k] != theirs[k])
            raise TopologyMismatch(
                name,
                f"exists with other arguments than expected (PRECONDITION_FAILED - inequivalent arg "
                f"{differ[0]!r} for queue {name!r}); delete it or fix the settings",
            )
        return queue

    def queue(self, name: str) -> Queue:
        """The queue named ``name`` (a passive declare).

        Raises:
            TopologyMismatch: it does not exist.
        """
        queue = self.queues.get(name)
        if queue is None:
            raise TopologyMismatch(name, "queue does not exist (declare the topology first)")
        return queue

    def bind(
        self, queue: str, exchange: str, routing_key: str, arguments: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        if queue not in self.queues or exchange not in self.exchanges:
            missing = queue if queue not in self.queues else exchange
            raise TransportError(f"cannot bind {queue} to {exchange} ({routing_key}): NOT_FOUND - {missing}")
        self.bindings.add(Binding(queue, exchange, routing_key, tuple(sorted(arguments))))

    def delete_queue(self, name: str) -> int:
        """Delete ``name`` with its bindings; its consumers are cancelled. Returns the messages it held."""
        queue = self.queues.pop(name)
        queue.close()
        self.bindings = {b for b in self.bindings if b.queue != name}
        for consumer in queue.consumers:
            consumer.cancelled_by_broker()
        return len(queue.ready)

    def delete_exchange(self, name: str) -> None:
        del self.exchanges[name]
        self.bindings = {b for b in self.bindings if b.exchange != name}

    # -- routing ------------------------------------------------------------------------------------

    def route(self, exchange: str, message: Message) -> list[Queue]:
        """The queues ``message`` goes to from ``exchange``.

        Raises:
            TransportError: no such exchange (RabbitMQ closes the channel with NOT_FOUND).
        """
        if exchange == "":
            queue = self.queues.get(message.routing_key)
            return [queue] if queue is not None else []
        kind = self.exchanges.get(exchange)
        if kind is None:
            raise TransportError(f"NOT_FOUND - no exchange {exchange!r} in vhost '/'")
        matches = _MATCHERS[kind]
        targets = {b.queue for b in self.bindings if b.exchange == exchange and matches(b, message)}
        return [self.queues[name] for name in sorted(targets) if name in self.queues]

    def enqueue(self, queues: list[Queue], message: Message) -> None:
        for queue in queues:
            # Each queue holds a copy of its own (headers included): dead-lettering edits them.
            queue.put(replace(message, headers=dict(message.headers)))
            self.pump(queue)

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        """Send ``message`` to the queue's dead-letter exchange (if it has one) with an ``x-death`` entry;
        the routing key is kept unless the queue names one."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return
        death = {"count": 1, "reason": reason, "queue": queue.name, "exchange": message.exchange}
        death["routing-keys"] = [message.routing_key]
        if message.expiration_ms is not None:
            death["original-expiration"] = str(message.expiration_ms)
        headers = dict(message.headers)
        headers["x-death"] = [death, *headers.get("x-death", [])]
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-exchange", message.exchange)
        dead = replace(
            message,
            headers=headers,
            exchange=str(exchange),
            routing_key=str(queue.arguments.get("x-dead-letter-routing-key", message.routing_key)),
            expiration_ms=None,
            redelivered=False,
        )
        try:
            targets = self.route(dead.exchange, dead)
        except TransportError:
            return
        # Outside the caller's loop iteration: an expiry or a reject dead-letters after it returns.
        asyncio.get_running_loop().call_soon(self.enqueue, targets, dead)

    # -- delivering ---------------------------------------------------------------------------------

    def pump(self, queue: Queue) -> None:
        """Hand ready messages to consumers with room."""
        while queue.ready and not queue.deleted:
            consumer = queue.next_consumer()
            if consumer is None:
                return
            entry = queue.take()
            if entry is None:
                return
            consumer.deliver(entry)

    def pump_all(self, credit: Credit | None = None) -> None:
        for queue in list(self.queues.values()):
            if queue.ready and (credit is None or any(c.credit is credit for c in queue.consumers)):
                self.pump(queue)


def _direct(binding: Binding, message: Message) -> bool:
    return binding.routing_key == message.routing_key


def _fanout(binding: Binding, message: Message) -> bool:
    return True


def _topic(binding: Binding, message: Message) -> bool:
    return topic_matches(binding.routing_key.split("."), message.routing_key.split("."))


def topic_matches(pattern: list[str], words: list[str]) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and topic_matches(rest, words[1:])


def headers_match(binding: Binding, message: Message) -> bool:
    """Headers-exchange matching: every (``x-match: all``) or some (``any``) non-``x-`` argument of the
    binding is a header of the message with the same value."""
    arguments = dict(binding.arguments)
    wanted = {k: v for k, v in arguments.items() if not k.startswith("x-")}
    found = [k in message.headers and message.headers[k] == v for k, v in wanted.items()]
    if arguments.get("x-match", "all") == "any":
        return any(found)
    return all(found)


_MATCHERS: dict[ExchangeType, Callable[[Binding, Message], bool]] = {
    ExchangeType.DIRECT: _direct,
    ExchangeType.FANOUT: _fanout,
    ExchangeType.TOPIC: _topic,
    ExchangeType.HEADERS: headers_match,
}
