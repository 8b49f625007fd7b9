"""The transport contract: one suite, run against RabbitMQ (the aio-pika adapter) and the in-memory
broker of :mod:`fabric.testing`.

Every test states what fabric relies on the broker for: routing through the exchanges of
:mod:`fabric.topology.spec`, confirms and mandatory routing (:class:`~fabric.errors.Unroutable`),
message and consumer priorities, per-consumer prefetch, settling with requeue and the redelivered flag,
dead-lettering (rejected, expired by a queue TTL or a per-message expiration), single active consumer,
and the admin operations (passive declares, counts, deletes).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from fabric.errors import PublishError, TopologyMismatch, TransportError, Unroutable
from fabric.topology import names, spec
from fabric.topology.spec import BindingSpec, ExchangeSpec, ExchangeType, QueueSpec, Topology
from fabric.transport.base import DEFAULT_EXCHANGE, Consumer, Delivery, Transport
from tests.conftest import eventually

#: Capabilities the suite declares queues for.
CAPS = ("echo", "slow")
#: Deadline of every wait: generous, since the machine is shared.
WAIT_S = 20.0


@dataclass
class UnderTest:
    """One broker under test: ``connect()`` opens another connection to the same broker;
    ``connect(faulty=True)`` one that ``cut()`` can break like a network fault."""

    name: str
    connect: Callable[..., Awaitable[Transport]]
    cut: Callable[[Transport], Awaitable[None]]
    opened: list[Transport] = field(default_factory=list)


@pytest.fixture(params=["amqp", "memory"])
async def under_test(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[UnderTest]:
    exits = contextlib.AsyncExitStack()
    if request.param == "amqp":
        from fabric.transport.amqp import AmqpConnection
        from tests.proxy import TcpProxy

        url = request.getfixturevalue("amqp_url")
        parsed = urlsplit(url)
        proxy = await exits.enter_async_context(TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672))
        through = parsed._replace(netloc=f"{parsed.username}:{parsed.password}@127.0.0.1:{proxy.port}")

        async def connect(*, faulty: bool = False) -> Transport:
            target = through.geturl() if faulty else url
            amqp = AmqpConnection(target, name=request.node.nodeid[:200], publish_timeout_s=10)
            await amqp.connect()
            chosen.opened.append(amqp)
            return amqp

        async def cut(transport: Transport) -> None:
            await proxy.cut()

    else:
        from fabric.testing import MemoryBroker
        from fabric.transport.memory_connection import MemoryConnection

        broker = MemoryBroker()

        async def connect(*, faulty: bool = False) -> Transport:
            connection = broker.connection(name=request.node.nodeid[:200], publish_timeout_s=10)
            await connection.connect()
            chosen.opened.append(connection)
            return connection

        async def cut(transport: Transport) -> None:
            assert isinstance(transport, MemoryConnection)
            broker.cut(transport)

    chosen = UnderTest(request.param, connect, cut)
    try:
        yield chosen
    finally:
        await exits.aclose()
        cleaner = next((t for t in chosen.opened if t.connected), None)
        if cleaner is not None:
            await cleaner.delete(spec.build(namespace, CAPS) + _extra(namespace))
        for transport in reversed(chosen.opened):
            await transport.close()


@pytest.fixture
async def transport(under_test: UnderTest) -> Transport:
    """A connected transport (closed, and the namespace's topology deleted, after the test)."""
    return await under_test.connect()


def _extra(ns: str) -> Topology:
    """A queue dead-lettering to a fanout exchange and its queue: what the DLX tests need beyond the spec."""
    return Topology(
        exchanges=(ExchangeSpec(f"{ns}.x.dlx", ExchangeType.FANOUT),),
        queues=(
            QueueSpec(f"{ns}.x.work", (("x-dead-letter-exchange", f"{ns}.x.dlx"),)),
            QueueSpec(f"{ns}.x.dlq"),
            QueueSpec(f"{ns}.x.plain"),
            QueueSpec(f"{ns}.x.short", (("x-max-length", 2),)),
        ),
        bindings=(BindingSpec(f"{ns}.x.dlq", f"{ns}.x.dlx"),),
    )


class Inbox:
    """Collects deliveries; settles them itself unless ``manual``."""

    def __init__(self, *, manual: bool = False) -> None:
        self.deliveries: list[Delivery] = []
        self.manual = manual

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if not self.manual:
            await delivery.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    async def wait(self, count: int, what: str = "deliveries") -> list[Delivery]:
        await eventually(lambda: len(self.deliveries) >= count, timeout=WAIT_S, what=f"{count} {what}")
        return self.deliveries


async def _ready(transport: Transport, queue: str, messages: int, consumers: int | None = None) -> None:
    async def counted() -> bool:
        info = await transport.queue_info(queue)
        return (
            info is not None
            and info.messages == messages
            and (consumers is None or info.consumers == consumers)
        )

    await eventually(counted, timeout=WAIT_S, what=f"{queue} to hold {messages} messages")


# -- routing ----------------------------------------------------------------------------------------


async def test_direct_exchange_routes_a_capability_to_its_queue_with_properties(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    inbox = Inbox()
    await transport.consume(names.capability_queue(namespace, "echo"), inbox, prefetch=10)
    await transport.publish(
        names.tasks_exchange(namespace),
        "echo",
        b"payload",
        headers={"fabric-task": "t1", "n": 3},
        message_id="m-1",
        correlation_id="c-1",
        reply_to="somewhere",
        priority=4,
        content_type="application/json",
    )
    [delivery] = await inbox.wait(1)
    assert delivery.body == b"payload"
    assert delivery.headers == {"fabric-task": "t1", "n": 3}
    assert delivery.message_id == "m-1"
    assert delivery.correlation_id == "c-1"
    assert delivery.reply_to == "somewhere"
    assert delivery.priority == 4
    assert delivery.content_type == "application/json"
    assert delivery.routing_key == "echo"
    assert delivery.redelivered is False


async def test_topic_exchange_routes_by_pattern_and_the_default_exchange_by_queue_name(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    events = Inbox()
    await transport.consume(names.events_queue(namespace), events, prefetch=10)
    await transport.publish(names.events_exchange(namespace), names.event_routing_key("completed"), b"e1")
    await transport.publish(names.events_exchange(namespace), "task.a.b.c", b"e2")
    with pytest.raises(Unroutable):
        await transport.publish(names.events_exchange(namespace), "workflow.done", b"no")
    await transport.publish(DEFAULT_EXCHANGE, names.events_queue(namespace), b"direct")
    await events.wait(3)
    assert sorted(events.bodies) == [b"direct", b"e1", b"e2"]


async def test_a_mandatory_publish_nobody_is_bound_for_raises_unroutable(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    with pytest.raises(Unroutable) as caught:
        await transport.publish(names.tasks_exchange(namespace), "nobody", b"x")
    # Unroutable is a PublishError and a TransportError: callers catching those keep working.
    assert isinstance(caught.value, PublishError)
    assert isinstance(caught.value, TransportError)
    assert caught.value.exchange == names.tasks_exchange(namespace)
    assert caught.value.routing_key == "nobody"
    # Not mandatory: dropped without an error.
    await transport.publish(names.tasks_exchange(namespace), "nobody", b"x", mandatory=False)
    # A deleted queue makes its routing key unroutable again.
    await transport.delete_queue(names.capability_queue(namespace, "echo"), if_unused=False, if_empty=False)
    with pytest.raises(Unroutable):
        await transport.publish(names.tasks_exchange(namespace), "echo", b"x")


async def test_publish_unconfirmed_delivers_and_never_raises(transport: Transport, namespace: str) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    inbox = Inbox()
    await transport.consume(names.events_queue(namespace), inbox, prefetch=10)
    assert await transport.publish_unconfirmed(names.events_exchange(namespace), "task.x", b"u")
    # Nobody bound: no error either.
    assert await transport.publish_unconfirmed(names.events_exchange(namespace), "nobody", b"lost")
    await inbox.wait(1)
    assert inbox.bodies == [b"u"]


# -- priorities and prefetch ------------------------------------------------------------------------


async def test_a_priority_queue_delivers_the_highest_priority_first(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    for priority in (1, 9, 5, 0):
        await transport.publish(
            names.tasks_exchange(namespace), "echo", str(priority).encode(), priority=priority
        )
    await _ready(transport, queue, 4)
    inbox = Inbox()
    await transport.consume(queue, inbox, prefetch=1)
    await inbox.wait(4)
    assert inbox.bodies == [b"9", b"5", b"1", b"0"]


async def test_prefetch_bounds_the_unacked_deliveries_of_a_consumer(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    for n in range(5):
        await transport.publish(names.tasks_exchange(namespace), "echo", str(n).encode())
    inbox = Inbox(manual=True)
    await transport.consume(queue, inbox, prefetch=2)
    await inbox.wait(2)
    # The other three wait in the queue while two are unacked.
    await _ready(transport, queue, 3, consumers=1)
    assert len(inbox.deliveries) == 2
    await inbox.deliveries[0].ack()
    await inbox.wait(3)
    await _ready(transport, queue, 2)
    assert len(inbox.deliveries) == 3


async def test_consume_many_shares_one_prefetch_across_queues(transport: Transport, namespace: str) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    for cap in CAPS:
        for n in range(3):
            await transport.publish(names.tasks_exchange(namespace), cap, f"{cap}{n}".encode())
    inbox = Inbox(manual=True)
    consumers = await transport.consume_many(
        {names.capability_queue(namespace, cap): inbox for cap in CAPS}, prefetch=2
    )
    assert [c.queue_name for c in consumers] == [names.capability_queue(namespace, cap) for cap in CAPS]
    await inbox.wait(2)

    async def left() -> int:
        infos = await transport.queue_infos([names.capability_queue(namespace, cap) for cap in CAPS])
        return sum(info.messages for info in infos.values() if info is not None)

    await eventually(lambda: _equals(left(), 4), timeout=WAIT_S, what="4 messages left in all")
    assert len(inbox.deliveries) == 2


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_the_broker_gives_messages_to_the_highest_priority_consumer_with_room(
    under_test: UnderTest, transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    low, high = Inbox(), Inbox()
    other = await under_test.connect()
    await other.consume_many({queue: low}, prefetch=10, priorities={queue: 1})
    await transport.consume_many({queue: high}, prefetch=10, priorities={queue: 5})
    await _ready(transport, queue, 0, consumers=2)
    for n in range(4):
        await transport.publish(names.tasks_exchange(namespace), "echo", str(n).encode())
    await high.wait(4)
    assert low.deliveries == []


# -- settling ---------------------------------------------------------------------------------------


async def test_nack_with_requeue_redelivers_with_the_redelivered_flag(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    inbox = Inbox(manual=True)
    await transport.consume(names.capability_queue(namespace, "echo"), inbox, prefetch=1)
    await transport.publish(names.tasks_exchange(namespace), "echo", b"again", message_id="m")
    [first] = await inbox.wait(1)
    assert first.redelivered is False
    await first.nack(requeue=True)
    # A second settle of the same delivery is ignored.
    await first.ack()
    second = (await inbox.wait(2))[1]
    assert (second.body, second.message_id, second.redelivered) == (b"again", "m", True)
    await second.ack()
    await _ready(transport, names.capability_queue(namespace, "echo"), 0)


async def test_reject_and_nack_without_requeue_dead_letter_to_the_queues_exchange(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(_extra(namespace))
    work = Inbox(manual=True)
    await transport.consume(f"{namespace}.x.work", work, prefetch=10)
    await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.work", b"r", headers={"keep": 1})
    await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.work", b"n")
    await work.wait(2)
    await work.deliveries[0].reject(requeue=False)
    await work.deliveries[1].nack(requeue=False)
    dead = Inbox()
    await transport.consume(f"{namespace}.x.dlq", dead, prefetch=10)
    await dead.wait(2)
    assert sorted(dead.bodies) == [b"n", b"r"]
    kept = next(d for d in dead.deliveries if d.body == b"r")
    assert kept.headers["keep"] == 1
    # The dead-lettered message keeps its routing key.
    assert kept.routing_key == f"{namespace}.x.work"


async def test_a_queue_without_dead_letter_exchange_drops_a_rejected_message(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(_extra(namespace))
    inbox = Inbox(manual=True)
    await transport.consume(f"{namespace}.x.plain", inbox, prefetch=10)
    await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.plain", b"gone")
    [delivery] = await inbox.wait(1)
    await delivery.reject()
    await _ready(transport, f"{namespace}.x.plain", 0)


async def test_a_delay_queue_dead_letters_after_its_ttl_back_to_the_capability_queue(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    tier = min(names.DELAY_TIERS_MS, key=names.DELAY_TIERS_MS.__getitem__)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The retry exchange is a headers exchange: the fabric-delay header picks the tier's queue.
    await transport.publish(names.retry_exchange(namespace), "echo", b"later", headers={"fabric-delay": tier})
    await _ready(transport, names.delay_queue(namespace, tier), 1)
    inbox = Inbox()
    await transport.consume(names.capability_queue(namespace, "echo"), inbox, prefetch=10)
    [delivery] = await inbox.wait(1)
    assert loop.time() - started >= names.DELAY_TIERS_MS[tier] / 1000 * 0.9
    assert (delivery.body, delivery.routing_key, delivery.headers["fabric-delay"]) == (b"later", "echo", tier)
    with pytest.raises(Unroutable):
        await transport.publish(names.retry_exchange(namespace), "echo", b"x", headers={"fabric-delay": "7y"})


async def test_a_per_message_expiration_dead_letters_the_message(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(_extra(namespace))
    await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.work", b"short", expiration_s=0.2)
    dead = Inbox()
    await transport.consume(f"{namespace}.x.dlq", dead, prefetch=10)
    await dead.wait(1)
    assert dead.bodies == [b"short"]
    await _ready(transport, f"{namespace}.x.work", 0)


# -- consumers --------------------------------------------------------------------------------------


async def test_single_active_consumer_delivers_to_one_consumer_until_it_leaves(
    under_test: UnderTest, transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.submit_queue(namespace)
    first, second = Inbox(), Inbox()
    active = await transport.consume(queue, first, prefetch=10)
    other = await under_test.connect()
    await other.consume(queue, second, prefetch=10)
    for n in range(3):
        await transport.publish(names.submit_exchange(namespace), names.SUBMIT_ROUTING_KEY, str(n).encode())
    await first.wait(3)
    assert second.deliveries == []
    await active.cancel()
    await transport.publish(names.submit_exchange(namespace), names.SUBMIT_ROUTING_KEY, b"next")
    await second.wait(1)
    assert second.bodies == [b"next"]


async def test_a_cancelled_consumer_can_resume_and_change_priority(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    inbox = Inbox()
    consumer: Consumer = await transport.consume(queue, inbox, prefetch=10)
    assert consumer.active
    assert consumer.queue_name == queue
    await eventually(lambda: consumer.healthy, timeout=WAIT_S, what="the consumer to be healthy")
    await consumer.cancel()
    assert not consumer.active
    assert not consumer.healthy
    await transport.publish(names.tasks_exchange(namespace), "echo", b"while-away")
    await _ready(transport, queue, 1, consumers=0)
    await consumer.resume()
    await inbox.wait(1)
    await consumer.set_priority(3)
    assert consumer.priority == 3
    await _ready(transport, queue, 0, consumers=1)
    await transport.publish(names.tasks_exchange(namespace), "echo", b"after")
    await inbox.wait(2)
    assert inbox.bodies == [b"while-away", b"after"]


async def test_get_one_and_browse_take_messages_without_a_subscription(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "slow")
    consumer = await transport.consume(queue, Inbox(), prefetch=1)
    await consumer.cancel()
    for n in range(3):
        await transport.publish(names.tasks_exchange(namespace), "slow", str(n).encode())
    async with transport.browse(queue, limit=2) as seen:
        assert [d.body for d in seen] == [b"0", b"1"]
        await seen[1].ack()
    # The one not acked went back at its place.
    await _ready(transport, queue, 2)
    taken = await consumer.get_one()
    assert taken is not None
    assert taken.body == b"0"
    await taken.ack()
    taken = await consumer.get_one()
    assert taken is not None
    assert taken.body == b"2"
    await taken.ack()
    assert await consumer.get_one() is None


async def test_a_reply_queue_is_exclusive_named_by_the_broker_and_reached_by_name(
    transport: Transport, namespace: str
) -> None:
    inbox = Inbox()
    consumer = await transport.reply_queue(inbox, prefetch=10)
    assert consumer.queue_name
    await transport.publish(DEFAULT_EXCHANGE, consumer.queue_name, b"reply", correlation_id="c")
    [delivery] = await inbox.wait(1)
    assert (delivery.body, delivery.correlation_id) == (b"reply", "c")
    # Bound to a topic exchange, it follows notifications too.
    await transport.declare(spec.build(namespace, CAPS))
    await consumer.bind(names.notify_exchange(namespace), "workflow.w1.*")
    await transport.publish(names.notify_exchange(namespace), names.workflow_notify_key("w1", "done"), b"n")
    await inbox.wait(2)


# -- admin ------------------------------------------------------------------------------------------


async def test_consuming_a_missing_queue_raises_topology_mismatch(
    transport: Transport, namespace: str
) -> None:
    with pytest.raises(TopologyMismatch):
        await transport.consume(f"{namespace}.missing", Inbox(), prefetch=1)
    assert await transport.queue_info(f"{namespace}.missing") is None


async def test_queue_info_counts_ready_messages_and_consumers(transport: Transport, namespace: str) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    for n in range(3):
        await transport.publish(names.tasks_exchange(namespace), "echo", str(n).encode())
    await _ready(transport, queue, 3, consumers=0)
    infos = await transport.queue_infos([queue, f"{namespace}.missing", names.dead_queue(namespace)])
    assert infos[f"{namespace}.missing"] is None
    assert infos[names.dead_queue(namespace)] is not None
    info = infos[queue]
    assert info is not None
    assert (info.name, info.messages, info.consumers) == (queue, 3, 0)
    inbox = Inbox(manual=True)
    await transport.consume(queue, inbox, prefetch=1)
    await inbox.wait(1)
    # Unacked deliveries are not counted as ready.
    await _ready(transport, queue, 2, consumers=1)


async def test_declaring_a_queue_with_other_arguments_raises_topology_mismatch(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    clash = Topology(queues=(QueueSpec(names.capability_queue(namespace, "echo"), (("x-max-priority", 3),)),))
    with pytest.raises(TopologyMismatch):
        await transport.declare(clash)
    problems = await transport.check(clash + Topology(queues=(QueueSpec(f"{namespace}.missing"),)))
    assert len(problems) == 2
    assert problems[1] == f"{namespace}.missing: missing"
    assert await transport.check(spec.build(namespace, CAPS)) == []


async def test_deletes_refuse_what_is_in_use_unless_told(transport: Transport, namespace: str) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    await transport.publish(names.tasks_exchange(namespace), "echo", b"x")
    await _ready(transport, queue, 1)
    refused = await transport.delete_queue(queue, if_unused=True, if_empty=True)
    assert not refused.deleted
    assert refused.why
    done = await transport.delete_queue(queue, if_unused=True, if_empty=False)
    assert done.deleted
    assert done.messages == 1
    gone = await transport.delete_queue(queue, if_unused=False, if_empty=False)
    assert not gone.deleted
    assert "not found" in gone.why
    bound = await transport.delete_exchange(names.events_exchange(namespace), if_unused=True)
    assert not bound.deleted
    missing = f"{namespace}.{uuid.uuid4().hex[:6]}"
    assert await transport.exchanges_exist([names.events_exchange(namespace), missing]) == {
        names.events_exchange(namespace): True,
        missing: False,
    }
    await transport.delete(spec.build(namespace, CAPS))
    assert (await transport.exchanges_exist([names.events_exchange(namespace)])) == {
        names.events_exchange(namespace): False
    }
    assert await transport.queue_info(names.events_queue(namespace)) is None


async def test_a_forgotten_topology_is_declared_again(transport: Transport, namespace: str) -> None:
    topology = spec.capability(namespace, "echo") + spec.core(namespace)
    await transport.declare(topology)
    await transport.delete_queue(names.capability_queue(namespace, "echo"), if_unused=False, if_empty=False)
    await transport.forget(spec.capability(namespace, "echo"))
    await transport.declare(spec.capability(namespace, "echo"))
    await transport.publish(names.tasks_exchange(namespace), "echo", b"routed")
    await _ready(transport, names.capability_queue(namespace, "echo"), 1)


async def test_a_closed_transport_refuses_use(under_test: UnderTest) -> None:
    transport = await under_test.connect()
    assert transport.connected
    await transport.close()
    assert not transport.connected
    with pytest.raises(Exception, match="not connected") as caught:
        await transport.publish(DEFAULT_EXCHANGE, "x", b"x")
    assert type(caught.value).__name__ == "NotConnectedError"


async def test_closing_a_connection_gives_its_unacked_deliveries_back_as_redelivered(
    under_test: UnderTest, transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    held = Inbox(manual=True)
    holder = await under_test.connect()
    await holder.consume(queue, held, prefetch=10)
    await transport.publish(names.tasks_exchange(namespace), "echo", b"held", message_id="h")
    await held.wait(1)
    await _ready(transport, queue, 0, consumers=1)
    await holder.close()
    # Settling on the closed connection is no error: the broker has the message back already.
    await held.deliveries[0].ack()
    inbox = Inbox()
    await transport.consume(queue, inbox, prefetch=10)
    [again] = await inbox.wait(1)
    assert (again.body, again.message_id, again.redelivered) == (b"held", "h", True)


async def test_channel_wide_prefetch_counts_one_limit_for_one_queue(
    transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    for n in range(3):
        await transport.publish(names.tasks_exchange(namespace), "echo", str(n).encode())
    inbox = Inbox(manual=True)
    [consumer] = await transport.consume_many({queue: inbox}, prefetch=1, channel_wide=True)
    await inbox.wait(1)
    await _ready(transport, queue, 2, consumers=1)
    await inbox.deliveries[0].ack()
    await inbox.wait(2)
    await _ready(transport, queue, 1)
    assert consumer.queue_name == queue


async def test_publishing_to_a_missing_exchange_is_a_transport_error_not_unroutable(
    transport: Transport, namespace: str
) -> None:
    with pytest.raises(TransportError) as caught:
        await transport.publish(f"{namespace}.no-such-exchange", "k", b"x")
    assert not isinstance(caught.value, Unroutable)
    assert "NOT_FOUND" in str(caught.value)
    # The connection stays usable.
    await transport.declare(_extra(namespace))
    await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.plain", b"after")
    await _ready(transport, f"{namespace}.x.plain", 1)


async def test_binding_a_missing_queue_is_a_transport_error(transport: Transport, namespace: str) -> None:
    await transport.declare(spec.core(namespace))
    missing = Topology(
        bindings=(BindingSpec(f"{namespace}.x.nothing", names.events_exchange(namespace), "#"),)
    )
    with pytest.raises(TransportError):
        await transport.declare(missing)


async def test_a_queue_with_max_length_drops_from_the_head(transport: Transport, namespace: str) -> None:
    await transport.declare(_extra(namespace))
    for n in range(3):
        await transport.publish(DEFAULT_EXCHANGE, f"{namespace}.x.short", str(n).encode())
    await _ready(transport, f"{namespace}.x.short", 2)
    inbox = Inbox()
    await transport.consume(f"{namespace}.x.short", inbox, prefetch=10)
    await inbox.wait(2)
    assert inbox.bodies == [b"1", b"2"]


async def test_a_consumer_whose_queue_was_deleted_resubscribes_once_it_is_declared_again(
    transport: Transport, namespace: str
) -> None:
    topology = spec.build(namespace, CAPS)
    await transport.declare(topology)
    queue = names.capability_queue(namespace, "echo")
    inbox = Inbox()
    consumer = await transport.consume(queue, inbox, prefetch=10)
    await eventually(lambda: consumer.healthy, timeout=WAIT_S, what="the consumer to be healthy")
    await transport.delete_queue(queue, if_unused=False, if_empty=False)
    # The broker cancels the consumer: still active (nobody cancelled it here), but no longer healthy.
    await eventually(lambda: not consumer.healthy, timeout=WAIT_S, what="the broker to cancel the consumer")
    assert consumer.active
    await transport.forget(spec.capability(namespace, "echo"))
    await transport.declare(spec.capability(namespace, "echo"))
    await consumer.resubscribe()
    await eventually(lambda: consumer.healthy, timeout=WAIT_S, what="the consumer to be back")
    await transport.publish(names.tasks_exchange(namespace), "echo", b"back")
    await inbox.wait(1)
    assert inbox.bodies == [b"back"]


async def test_a_lost_connection_comes_back_with_its_consumers_and_gives_unacked_messages_back(
    under_test: UnderTest, transport: Transport, namespace: str
) -> None:
    await transport.declare(spec.build(namespace, CAPS))
    queue = names.capability_queue(namespace, "echo")
    faulty = await under_test.connect(faulty=True)
    lost, restored = asyncio.Event(), asyncio.Event()
    faulty.on_lost.append(lost.set)
    faulty.on_restored.append(restored.set)
    inbox = Inbox(manual=True)
    consumer = await faulty.consume(queue, inbox, prefetch=10)
    await transport.publish(names.tasks_exchange(namespace), "echo", b"held", message_id="h")
    [held] = await inbox.wait(1)
    await under_test.cut(faulty)
    await asyncio.wait_for(lost.wait(), WAIT_S)
    # Settling on the lost connection is no error: the broker has the message back already.
    await held.ack()
    await asyncio.wait_for(restored.wait(), 60)
    await eventually(lambda: faulty.connected and consumer.healthy, timeout=60, what="the consumer back")
    again = (await inbox.wait(2))[1]
    assert (again.body, again.message_id, again.redelivered) == (b"held", "h", True)
    await again.ack()
    # Publishing works again on the restored connection, and its consumer receives.
    await faulty.publish(names.tasks_exchange(namespace), "echo", b"after")
    await inbox.wait(3)
    assert inbox.bodies[2] == b"after"
