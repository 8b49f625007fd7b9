"""Topology: declaring (idempotent, cached), checking, inspecting and deleting queues and exchanges."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractChannel

from fabric.errors import TopologyMismatch, TransportError
from fabric.topology.spec import BindingSpec, ExchangeSpec, QueueSpec, Topology
from fabric.topology.teardown import Deletion
from fabric.transport.base import QueueInfo
from fabric.transport.connection import AmqpLink


class AmqpAdmin(AmqpLink):
    """The topology part of :class:`fabric.transport.amqp.AmqpConnection`."""

    def __init__(self, url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> None:
        super().__init__(url, name=name, publish_timeout_s=publish_timeout_s)
        self._declared: set[ExchangeSpec | QueueSpec | BindingSpec] = set()
        self._declare_lock = asyncio.Lock()

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
