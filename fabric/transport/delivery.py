"""A delivery from an AMQP queue, and the guard every consumer callback runs in."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage

from fabric.transport.base import DeliveryCallback

log = logging.getLogger("fabric.transport")

#: ``basic_ack(wait=False)``: the ack goes out with the next write (aiormq versions without it wait).
_ACK_NO_WAIT: dict[str, Any] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_ack).parameters else {}
)


class AmqpDelivery:
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


def guard_callback(
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

    async def guarded(delivery: AmqpDelivery) -> None:
        try:
            await callback(delivery)
        except Exception:
            # Callbacks settle their own deliveries and guard their own errors; reaching here is a bug.
            # Requeueing keeps the message; the pause keeps a persistent bug from spinning hot.
            log.exception("consumer of %s crashed on message %s; requeueing it", queue, delivery.message_id)
            await asyncio.sleep(1.0)
            await delivery.nack(requeue=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        handler = asyncio.create_task(guarded(AmqpDelivery(message)))
        handlers.add(handler)
        handler.add_done_callback(handlers.discard)
        # The channel's task waits for the handler, so the channel's prefetch accounting is unchanged; if
        # the channel closes, only this wait is cancelled.
        await asyncio.shield(handler)

    return on_message
