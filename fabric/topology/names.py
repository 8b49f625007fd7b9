"""The only place exchange and queue names are built (docs/protocol.md §1). Every name starts with the
namespace."""

from __future__ import annotations

import re

from fabric.policy import DEFAULT_TIERS_MS
from fabric.protocol.messages import CAPABILITY_PATTERN

_CAPABILITY_RE = re.compile(CAPABILITY_PATTERN)

#: Routing key of submissions on ``{ns}.submit``.
SUBMIT_ROUTING_KEY = "workflow"

#: Routing keys of the router's RPC methods on ``{ns}.rpc`` (each bound to ``{ns}.router.rpc``).
RPC_METHODS = (
    "status",
    "result",
    "why",
    "agents",
    "ping",
    "replay",
    "cancel",
    "resume",
    "abort",
    "cancelled",
)

#: Backoff tiers of the retry ladder: name -> delay in milliseconds. Each tier is its own queue with a
#: fixed per-queue TTL, because RabbitMQ expires messages only at the head of a queue: a short delay
#: sharing a queue with a long one would wait behind it.
DELAY_TIERS_MS = DEFAULT_TIERS_MS


def check_capability(capability: str) -> str:
    """Return ``capability`` if it is a valid capability name, else raise ValueError naming the rule."""
    if not _CAPABILITY_RE.fullmatch(capability):
        raise ValueError(f"invalid capability {capability!r}: must match {CAPABILITY_PATTERN}")
    return capability


def submit_exchange(ns: str) -> str:
    return f"{ns}.submit"


def submit_queue(ns: str) -> str:
    return f"{ns}.router.submit"


def tasks_exchange(ns: str) -> str:
    return f"{ns}.tasks"


def capability_queue(ns: str, capability: str) -> str:
    return f"{ns}.cap.{check_capability(capability)}"


def retry_exchange(ns: str) -> str:
    return f"{ns}.retry"


def delay_queue(ns: str, tier: str) -> str:
    if tier not in DELAY_TIERS_MS:
        raise ValueError(f"unknown delay tier {tier!r}; known: {', '.join(DELAY_TIERS_MS)}")
    return f"{ns}.delay.{tier}"


def events_exchange(ns: str) -> str:
    return f"{ns}.events"


def events_queue(ns: str) -> str:
    return f"{ns}.router.events"


def notify_exchange(ns: str) -> str:
    return f"{ns}.notify"


def dead_exchange(ns: str) -> str:
    return f"{ns}.dead"


def dead_queue(ns: str) -> str:
    return f"{ns}.dead"


def alerts_exchange(ns: str) -> str:
    return f"{ns}.alerts"


def heartbeats_exchange(ns: str) -> str:
    return f"{ns}.heartbeats"


def heartbeats_queue(ns: str) -> str:
    return f"{ns}.router.heartbeats"


def control_exchange(ns: str) -> str:
    return f"{ns}.control"


def rpc_exchange(ns: str) -> str:
    return f"{ns}.rpc"


def rpc_queue(ns: str) -> str:
    return f"{ns}.router.rpc"


def event_routing_key(status: str) -> str:
    return f"task.{status}"


def alert_routing_key(severity: str, kind: str) -> str:
    """``alert.<severity>.<kind>`` on ``{ns}.alerts``; ``kind`` may hold dots (``task.escalated``), so
    bind ``alert.#`` for everything, ``alert.critical.#`` for one severity, ``alert.*.task.#`` for a kind."""
    return f"alert.{severity}.{kind}"


def workflow_notify_key(workflow_id: str, status: str) -> str:
    return f"workflow.{workflow_id}.{status}"


def task_notify_key(workflow_id: str, task_id: str, status: str) -> str:
    return f"task.{workflow_id}.{task_id}.{status}"
