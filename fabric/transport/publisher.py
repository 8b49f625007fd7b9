"""Publishing: confirmed and mandatory on one channel (confirms pipelined), or best effort on another."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractChannel

from fabric.errors import PublishError, TransportError, Unroutable
from fabric.transport.connection import AmqpLink

log = logging.getLogger("fabric.transport")

#: ``basic_publish(wait=False)``: return once the frames are queued for the socket instead of after an
#: extra event loop round trip for the write (aiormq versions without the argument always wait).
_NO_WAIT: dict[str, Any] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_publish).parameters else {}
)


class AmqpPublishing(AmqpLink):
    """The publishing part of :class:`fabric.transport.amqp.AmqpConnection`."""

    def __init__(self, url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> None:
        super().__init__(url, name=name, publish_timeout_s=publish_timeout_s)
        #: Called with the exchange and the seconds from publish to the broker's confirm, for each
        #: confirmed publish (the publish-confirm latency metric).
        self.on_confirm: Callable[[str, float], None] | None = None

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
            Unroutable: the broker returned the message (``mandatory``): no queue is bound for it.
            PublishError: the broker nacked the message, or did not confirm within the publish timeout.
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
            # basic.return of a mandatory message: no queue is bound for it.
            raise Unroutable(
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


def _is_ack(confirm: Any) -> bool:
    return type(confirm).__name__ == "Ack" or not type(confirm).__name__.startswith("N")
