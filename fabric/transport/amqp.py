"""The AMQP adapter: with its modules, the only code that imports aio-pika and aiormq.

Broker errors are translated here, once, into :mod:`fabric.errors`. Above this package fabric speaks
of publishing, consuming and settling deliveries (the Protocols of :mod:`fabric.transport.base`);
never of aio-pika objects. The adapter is split by concern:

* :mod:`~fabric.transport.connection`: connecting, reconnecting, writes coalesced per loop iteration;
* :mod:`~fabric.transport.publisher`: confirmed + mandatory publishes, and best-effort ones;
* :mod:`~fabric.transport.consumer` and :mod:`~fabric.transport.delivery`: consumers and deliveries;
* :mod:`~fabric.transport.admin`: declaring, checking, inspecting and deleting the topology.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fabric.transport.admin import AmqpAdmin
from fabric.transport.base import DEFAULT_EXCHANGE, Delivery, DeliveryCallback, QueueInfo, Transport
from fabric.transport.connection import COALESCE_WRITES, GREETING_TIMEOUT_S
from fabric.transport.consumer import AmqpConsuming, Consumer
from fabric.transport.delivery import AmqpDelivery
from fabric.transport.publisher import AmqpPublishing

__all__ = [
    "COALESCE_WRITES",
    "DEFAULT_EXCHANGE",
    "GREETING_TIMEOUT_S",
    "AmqpConnection",
    "AmqpDelivery",
    "Consumer",
    "Delivery",
    "DeliveryCallback",
    "QueueInfo",
]


class AmqpConnection(AmqpPublishing, AmqpConsuming, AmqpAdmin):
    """A robust AMQP connection with one confirmed publish channel and one channel per consumer; a
    :class:`fabric.transport.base.Transport`.

    Example:
        >>> async with AmqpConnection(url, name="router") as amqp:
        ...     await amqp.declare(topology)
        ...     await amqp.publish("fabric.submit", "workflow", body)
    """

    async def __aenter__(self) -> AmqpConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


if TYPE_CHECKING:
    # The type checker holds the adapter to the seam: a missing or changed method fails `make type`.
    _is_a_transport: type[Transport] = AmqpConnection
