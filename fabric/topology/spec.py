"""Frozen, hashable specifications of the topology, built purely from the namespace and capabilities."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fabric.topology import names

_T = TypeVar("_T")

#: Priority levels of capability queues (0..9). Quorum queues reject x-max-priority on RabbitMQ 3.x,
#: so capability queues are classic queues.
MAX_PRIORITY = 9
#: Heartbeats are only useful fresh: the router's queue drops them after this long.
HEARTBEAT_TTL_MS = 30_000
#: ... and never holds more than this many.
HEARTBEAT_MAX_LENGTH = 10_000


class ExchangeType(enum.StrEnum):
    DIRECT = "direct"
    TOPIC = "topic"
    FANOUT = "fanout"
    HEADERS = "headers"


def _frozen(arguments: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((arguments or {}).items()))


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: tuple[tuple[str, Any], ...] = ()

    @property
    def arguments_dict(self) -> dict[str, Any]:
        return dict(self.arguments)


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str = ""
    arguments: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Topology:
    """Exchanges, queues and bindings to declare, in that order. Everything is durable."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            exchanges=_unique(self.exchanges + other.exchanges),
            queues=_unique(self.queues + other.queues),
            bindings=_unique(self.bindings + other.bindings),
        )


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


def core(ns: str) -> Topology:
    """Everything that does not depend on capabilities (docs/protocol.md §1)."""
    n = names
    exchanges = (
        ExchangeSpec(n.submit_exchange(ns), ExchangeType.DIRECT),
        ExchangeSpec(n.tasks_exchange(ns), ExchangeType.DIRECT),
        ExchangeSpec(n.retry_exchange(ns), ExchangeType.HEADERS),
        ExchangeSpec(n.events_exchange(ns), ExchangeType.TOPIC),
        ExchangeSpec(n.notify_exchange(ns), ExchangeType.TOPIC),
        ExchangeSpec(n.dead_exchange(ns), ExchangeType.FANOUT),
        ExchangeSpec(n.alerts_exchange(ns), ExchangeType.TOPIC),
        ExchangeSpec(n.heartbeats_exchange(ns), ExchangeType.FANOUT),
        ExchangeSpec(n.control_exchange(ns), ExchangeType.FANOUT),
        ExchangeSpec(n.rpc_exchange(ns), ExchangeType.DIRECT),
    )
    # Single active consumer: a second router started as a standby waits instead of processing the
    # same workflows concurrently (the router is the single writer of workflow state).
    sac = _frozen({"x-single-active-consumer": True})
    queues = [
        QueueSpec(n.submit_queue(ns), sac),
        QueueSpec(n.events_queue(ns), sac),
        QueueSpec(n.rpc_queue(ns)),
        QueueSpec(n.dead_queue(ns)),
        QueueSpec(
            n.heartbeats_queue(ns),
            _frozen({"x-message-ttl": HEARTBEAT_TTL_MS, "x-max-length": HEARTBEAT_MAX_LENGTH}),
        ),
    ]
    bindings = [
        BindingSpec(n.submit_queue(ns), n.submit_exchange(ns), n.SUBMIT_ROUTING_KEY),
        BindingSpec(n.events_queue(ns), n.events_exchange(ns), "task.#"),
        BindingSpec(n.dead_queue(ns), n.dead_exchange(ns)),
        BindingSpec(n.heartbeats_queue(ns), n.heartbeats_exchange(ns)),
    ]
    for method in n.RPC_METHODS:
        bindings.append(BindingSpec(n.rpc_queue(ns), n.rpc_exchange(ns), method))
    for tier, ttl_ms in names.DELAY_TIERS_MS.items():
        queue = n.delay_queue(ns, tier)
        # No x-dead-letter-routing-key: dead-lettering keeps the message's own routing key, which is
        # the capability, so an expired retry lands back on its capability queue.
        queues.append(
            QueueSpec(
                queue, _frozen({"x-message-ttl": ttl_ms, "x-dead-letter-exchange": n.tasks_exchange(ns)})
            )
        )
        bindings.append(
            BindingSpec(queue, n.retry_exchange(ns), "", _frozen({"x-match": "all", "fabric-delay": tier}))
        )
    return Topology(exchanges=exchanges, queues=tuple(queues), bindings=tuple(bindings))


def capability(ns: str, cap: str) -> Topology:
    """The priority queue of one capability and its binding to ``{ns}.tasks``."""
    queue = names.capability_queue(ns, cap)
    return Topology(
        exchanges=(ExchangeSpec(names.tasks_exchange(ns), ExchangeType.DIRECT),),
        queues=(QueueSpec(queue, _frozen({"x-max-priority": MAX_PRIORITY})),),
        bindings=(BindingSpec(queue, names.tasks_exchange(ns), cap),),
    )


def build(ns: str, capabilities: Iterable[str] = ()) -> Topology:
    """The core topology plus one queue per capability."""
    topology = core(ns)
    for cap in capabilities:
        topology = topology + capability(ns, cap)
    return topology
