"""Parking a message as it came: the one way router and worker move a message they cannot process to
the dead-letter exchange (docs/protocol.md §9), with why, before they ack it."""

from __future__ import annotations

from fabric.protocol import headers
from fabric.transport.base import Delivery, Publisher


async def park_as_received(
    publisher: Publisher, dead_exchange: str, delivery: Delivery, *, reason: str, detail: str
) -> None:
    """Publish ``delivery`` unchanged to ``dead_exchange`` under its own routing key, its headers
    extended with the reason, the error and the route it came by (confirmed). The caller acks it after.

    Raises:
        TransportError: not confirmed; the caller leaves the message to come back later.
    """
    await publisher.publish(
        dead_exchange,
        delivery.routing_key,
        delivery.body,
        headers=headers.parked(
            delivery.headers, reason=reason, last_error=detail, routing_key=delivery.routing_key
        ),
        content_type=delivery.content_type or "application/octet-stream",
        message_id=delivery.message_id,
    )
