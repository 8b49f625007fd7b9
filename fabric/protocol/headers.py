"""AMQP header names of the wire contract (docs/protocol.md §4) and typed helpers to read them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

#: Workflow the task belongs to.
WORKFLOW_ID = "fabric-workflow-id"
#: Task id, unique inside its workflow.
TASK_ID = "fabric-task-id"
#: 1-based attempt number of this delivery.
ATTEMPT = "fabric-attempt"
#: Attempts allowed in all.
MAX_ATTEMPTS = "fabric-max-attempts"
#: Per-attempt time limit in seconds.
TIMEOUT_S = "fabric-timeout-s"
#: Agent ids that failed this task and should not get it again.
AVOID = "fabric-avoid"
#: How many times agents listed in ``fabric-avoid`` handed the task on (bounded).
BOUNCES = "fabric-bounces"
#: "true" when the agents in ``fabric-avoid`` must not run the task (a handler's ``Reassign``), not
#: merely should not.
MUST_AVOID = "fabric-must-avoid"
#: When the task became ready to run, in milliseconds since the epoch (an integer): the router's
#: publish, or the end of a retry's delay. A worker's queue-wait metric is its start time minus this.
DISPATCHED_AT_MS = "fabric-dispatched-at-ms"
#: ``park`` or ``escalate``: what the worker's policy does once the task is out of attempts (absent:
#: the worker's own settings decide).
ON_EXHAUSTED = "fabric-on-exhausted"
#: Delay tier of a message sent through ``{ns}.retry``.
DELAY = "fabric-delay"
#: Why a message was parked on ``{ns}.dead``.
DEAD_REASON = "fabric-dead-reason"
#: The last error of a parked task, "Type: message".
LAST_ERROR = "fabric-last-error"
#: The routing key a parked message was published with (its capability, for a task).
ORIGINAL_ROUTING_KEY = "fabric-original-routing-key"
#: When a message was parked, in milliseconds since the epoch (an integer: AMQP floats in headers are
#: sent as 32-bit and would lose a minute of precision).
PARKED_AT_MS = "fabric-parked-at-ms"
#: The agent that parked a task message.
AGENT_ID = "fabric-agent-id"
#: W3C trace context.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: With tracing: a table ``{dependency task id: traceparent}`` of the spans of the task's other
#: dependencies (those that did not release it), which its attempt spans link to.
LINKS = "fabric-links"
#: With tracing: the ``traceparent`` of the span of the task's previous attempt (set by a retry, a
#: reassignment, a replay or a resume), which the next attempt's span links to.
PREVIOUS_ATTEMPT = "fabric-previous-attempt"
#: On a submission: ``true`` asks for a notification per task state change of this workflow on
#: ``{ns}.notify`` (the router's ``task_notifications`` setting ``requested``, the default).
NOTIFY_TASKS = "fabric-notify-tasks"


def get_str(headers: Mapping[str, Any] | None, name: str, default: str = "") -> str:
    """Read a header as text (AMQP may hand strings back as bytes)."""
    if not headers or name not in headers or headers[name] is None:
        return default
    value = headers[name]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def get_int(headers: Mapping[str, Any] | None, name: str, default: int) -> int:
    """Read a header as an integer, falling back to ``default`` when absent or not a number."""
    raw = get_str(headers, name, "")
    try:
        return int(float(raw)) if raw else default
    except (ValueError, OverflowError):
        return default


def get_float(headers: Mapping[str, Any] | None, name: str, default: float | None) -> float | None:
    """Read a header as a float, falling back to ``default`` when absent or not a number."""
    raw = get_str(headers, name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def get_bool(headers: Mapping[str, Any] | None, name: str) -> bool:
    """Read a flag header: an AMQP boolean, or ``true``/``1``/``yes`` as text (any case)."""
    value = headers.get(name) if headers else None
    if isinstance(value, bool):
        return value
    return get_str(headers, name).strip().lower() in {"true", "1", "yes"}


def now_ms(delay_ms: float = 0) -> int:
    """The time (plus ``delay_ms``) in integer milliseconds since the epoch, as time headers carry it."""
    return int(time.time() * 1000 + delay_ms)


def get_list(headers: Mapping[str, Any] | None, name: str) -> list[str]:
    """Read a header holding a list of strings (an AMQP array)."""
    if not headers or not headers.get(name):
        return []
    value = headers[name]
    if isinstance(value, list | tuple):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value]
    return [get_str(headers, name)]


def get_table(headers: Mapping[str, Any] | None, name: str) -> dict[str, str]:
    """Read a header holding a table of strings (an AMQP field table); anything else reads as empty."""
    value = headers.get(name) if headers else None
    if not isinstance(value, Mapping):
        return {}
    return {
        str(k): (v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v))
        for k, v in value.items()
    }


def parked(
    original: Mapping[str, Any] | None,
    *,
    reason: str,
    last_error: str,
    routing_key: str,
    at_ms: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Headers of a message parked on ``{ns}.dead``: its own, plus why, its last error, its route and
    when (``at_ms``, by default now)."""
    result = dict(original or {})
    result[DEAD_REASON] = reason
    result[LAST_ERROR] = last_error[:1000]
    result[ORIGINAL_ROUTING_KEY] = routing_key
    result[PARKED_AT_MS] = now_ms() if at_ms is None else at_ms
    result.update(extra)
    return result
