"""The AsyncAPI 3.0 document of fabric's wire contract, generated from the code so it never drifts.

Channels come from :mod:`fabric.topology.spec` (every exchange and queue the processes declare, with
their types and arguments), message payloads from the pydantic models of
:mod:`fabric.protocol.messages` (their JSON schemas), header names from :mod:`fabric.protocol.headers`.
What this module adds by hand is only the pairing: which messages travel on which exchange, and who
sends and receives them. ``fabric docs asyncapi`` writes it.
"""

from __future__ import annotations

import inspect
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from fabric import __version__
from fabric.protocol import headers as h
from fabric.protocol import messages
from fabric.topology import names, spec

__all__ = ["CAPABILITY_PLACEHOLDER", "asyncapi_document", "message_models"]

#: Stands for any capability in the address of the capability queues.
CAPABILITY_PLACEHOLDER: Final = "{capability}"
_SCHEMAS: Final = "#/components/schemas/"
_AMQP_BINDING: Final = "0.3.0"


def message_models() -> list[type[BaseModel]]:
    """Every pydantic model of the wire protocol (messages and the parts they are made of)."""
    return [
        obj
        for _, obj in inspect.getmembers(messages, inspect.isclass)
        if issubclass(obj, BaseModel) and obj is not BaseModel and obj.__module__ == messages.__name__
    ]


def _header(description: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "description": description, **extra}


_TRACE_HEADERS: Final = {
    h.TRACEPARENT: _header("W3C trace context (when tracing)."),
    h.TRACESTATE: _header("W3C trace state (when tracing)."),
}
_TASK_HEADERS: Final = {
    h.WORKFLOW_ID: _header("Workflow the task belongs to."),
    h.TASK_ID: _header("Task id, unique in its workflow."),
    h.ATTEMPT: _header("1-based attempt number.", "integer", minimum=1),
    h.MAX_ATTEMPTS: _header("Attempts allowed in all.", "integer", minimum=1),
    h.TIMEOUT_S: _header("Per-attempt time limit in seconds (only when the task set one).", "number"),
    h.AVOID: _header("Agent ids that failed the task.", "array", items={"type": "string"}),
    h.BOUNCES: _header("Hand-overs by agents listed in fabric-avoid.", "integer"),
    h.MUST_AVOID: _header('"true" when the agents in fabric-avoid must not run it (Reassign).'),
    h.DISPATCHED_AT_MS: _header("When the task became ready, ms since the epoch.", "integer"),
    h.ON_EXHAUSTED: _header(
        "park or escalate once out of attempts.", enum=[str(v) for v in messages.OnExhausted]
    ),
    h.DELAY: _header("Delay tier of a retry (on {ns}.retry).", enum=list(names.DELAY_TIERS_MS)),
    h.LAST_ERROR: _header('The last error, "Type: message".'),
    h.LINKS: _header(
        "With tracing: {dependency task id: traceparent} of the other dependencies' attempt spans.",
        "object",
        additionalProperties={"type": "string"},
    ),
    h.PREVIOUS_ATTEMPT: _header("With tracing: traceparent of the previous attempt's span."),
    **_TRACE_HEADERS,
}
_SUBMISSION_HEADERS: Final = {
    h.NOTIFY_TASKS: _header(
        "true: publish a notification per task state change of this workflow on {ns}.notify "
        "(the router's default task_notifications setting, requested).",
        "boolean",
    ),
    **_TRACE_HEADERS,
}
_PARKED_HEADERS: Final = {
    h.DEAD_REASON: _header("Why the message was parked (exhausted, worker_lost, malformed_task, ...)."),
    h.LAST_ERROR: _header('The last error, "Type: message".'),
    h.ORIGINAL_ROUTING_KEY: _header("The routing key it was published with."),
    h.PARKED_AT_MS: _header("When it was parked, ms since the epoch.", "integer"),
    h.AGENT_ID: _header("The agent that parked it."),
}

#: Messages without a model of their own: hand-written schemas, each a small map.
_EXTRA_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "TaskNotification": {
        "type": "object",
        "description": "A task's new status on {ns}.notify (task.<workflow_id>.<task_id>.<status>).",
        "properties": {
            "workflow_id": {"type": "string"},
            "task_id": {"type": "string"},
            "status": {"$ref": f"{_SCHEMAS}TaskStatus"},
            "attempts": {"type": "integer"},
            "agent": {"type": ["string", "null"]},
            "error": {"anyOf": [{"$ref": f"{_SCHEMAS}ErrorInfo"}, {"type": "null"}]},
        },
        "required": ["workflow_id", "task_id", "status"],
    },
    "Cancel": {
        "type": "object",
        "description": "Broadcast on {ns}.control: stop a workflow's (or some tasks') running handlers and "
        "drop every copy of them (the router lists task_ids; without them: the whole workflow).",
        "properties": {
            "kind": {"const": "cancel"},
            "workflow_id": {"type": "string"},
            "task_ids": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["kind", "workflow_id"],
    },
    "Query": {
        "type": "object",
        "description": "A query on {ns}.rpc; the routing key names it (status, result, why, agents, ping, "
        "replay, cancel, resume, abort, cancelled).",
        "properties": {
            "workflow_id": {"type": "string"},
            "task_id": {"type": "string"},
            "cursor": {"type": "string", "description": "cancelled: the page after this cursor"},
        },
    },
    "QueryReply": {
        "type": "object",
        "description": 'The answer to a query: {"ok": true, "data": ...} or {"ok": false, "error": ...}.',
        "properties": {
            "ok": {"type": "boolean"},
            "data": {},
            "error": {"$ref": f"{_SCHEMAS}ErrorInfo"},
        },
        "required": ["ok"],
    },
    "Parked": {
        "description": "The parked message's own body (a task message, or bytes that did not decode)."
    },
}

#: Message name -> (payload schema, description, headers, content types).
_MESSAGES: Final[dict[str, tuple[str, str, dict[str, Any], str]]] = {
    "Submission": (
        "Submission", "A workflow to run (docs/protocol.md §2).", _SUBMISSION_HEADERS, "application/json"
    ),
    "Accepted": ("Accepted", "Reply: stored, ready tasks queued.", {}, "application/json"),
    "Rejected": ("Rejected", "Reply: refused; nothing stored.", {}, "application/json"),
    "Completed": ("Completed", "Reply and notification: the workflow finished.", {}, "application/json"),
    "TaskMessage": ("TaskBody", "A task to run (docs/protocol.md §4).", _TASK_HEADERS, "application/msgpack"),
    "TaskEvent": (
        "TaskEvent",
        "What happened to an attempt (docs/protocol.md §5).",
        _TRACE_HEADERS,
        "application/msgpack",
    ),
    "TaskNotification": (
        "TaskNotification",
        "A task's new status, for workflows submitted with fabric-notify-tasks.",
        {},
        "application/msgpack",
    ),
    "Heartbeat": ("Heartbeat", "An agent's heartbeat.", {}, "application/msgpack"),
    "Alert": ("Alert", "A threshold or escalation alert.", {}, "application/json"),
    "Cancel": ("Cancel", "Cancel running or queued tasks.", {}, "application/msgpack"),
    "Query": ("Query", "A query to the router.", {}, "application/msgpack"),
    "QueryReply": ("QueryReply", "The router's answer.", {}, "application/msgpack"),
    "Parked": (
        "Parked", "A message parked for an operator.", _TASK_HEADERS | _PARKED_HEADERS, "application/msgpack"
    ),
}  # fmt: skip

#: Which messages travel through each exchange (by its name without the namespace), and which
#: operation sends them: (sender, what it does).
_EXCHANGE_MESSAGES: Final[dict[str, list[str]]] = {
    "submit": ["Submission"],
    "tasks": ["TaskMessage"],
    "retry": ["TaskMessage"],
    "events": ["TaskEvent"],
    "notify": ["Completed", "TaskNotification"],
    "dead": ["Parked"],
    "alerts": ["Alert"],
    "heartbeats": ["Heartbeat"],
    "control": ["Cancel"],
    "rpc": ["Query"],
}
_SENDERS: Final[dict[str, tuple[str, str]]] = {
    "submit": ("client", "Submit a workflow (routing key `workflow`)."),
    "tasks": ("router", "Publish a ready task (routing key = capability, mandatory)."),
    "retry": ("worker", "Send a failed attempt to wait in its delay tier (header fabric-delay)."),
    "events": ("worker", "Report an attempt (routing key task.<status>), confirmed before the ack."),
    "notify": ("router", "Announce outcomes (workflow.<id>.<status>, task.<wf>.<task>.<status>)."),
    "dead": ("worker", "Park a message that will not run (the router parks too)."),
    "alerts": ("router", "Raise or resolve an alert (alert.<severity>.<kind>)."),
    "heartbeats": ("worker", "Heartbeat (non-persistent, expires after three intervals)."),
    "control": ("router", "Broadcast a cancellation to every worker."),
    "rpc": ("client", "Ask the router (routing key = query name; reply to reply_to)."),
}
#: Queue (name without the namespace, or a prefix) -> (messages, consumer, what it does).
_QUEUES: Final[list[tuple[str, list[str], str, str]]] = [
    ("router.submit", ["Submission"], "router", "Admit submissions (single active consumer)."),
    ("router.events", ["TaskEvent"], "router", "Record task events (single active consumer)."),
    ("router.rpc", ["Query"], "router", "Answer queries."),
    ("router.heartbeats", ["Heartbeat"], "router", "Track agents."),
    ("dead", ["Parked"], "operator", "Inspect, replay or purge parked messages (fabric dead ...)."),
    ("delay.", ["TaskMessage"], "broker", "Hold a retry for its tier, then dead-letter it to {ns}.tasks."),
    ("cap.", ["TaskMessage"], "worker", "Run the tasks of one capability."),
]


def _channel_id(name: str, ns: str, kind: str) -> str:
    short = name[len(ns) + 1 :] if name.startswith(f"{ns}.") else name
    cleaned = "".join(c if c.isalnum() else "_" for c in short.replace(CAPABILITY_PLACEHOLDER, "capability"))
    return f"{kind}_{cleaned}"


def _message_refs(channel_id: str, message_names: list[str]) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in message_names]


def asyncapi_document(ns: str = "fabric") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the fabric in namespace ``ns``.

    Example:
        >>> doc = asyncapi_document("fabric")
        >>> doc["channels"]["exchange_submit"]["address"]
        'fabric.submit'
    """
    models = message_models()
    _, top = models_json_schema(
        [(model, "validation") for model in models], ref_template=_SCHEMAS + "{model}"
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    schemas.update(_EXTRA_SCHEMAS)

    components_messages = {
        name: {
            "name": name,
            "title": name,
            "summary": summary,
            "contentType": content_type,
            "payload": {"$ref": _SCHEMAS + payload},
            **({"headers": {"type": "object", "properties": hdrs}} if hdrs else {}),
        }
        for name, (payload, summary, hdrs, content_type) in _MESSAGES.items()
    }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    # A topology with the placeholder capability: names.capability_queue refuses a brace, so build the
    # capability part from the real spec of an example capability and swap its name in.
    example = "example"
    topology = spec.build(ns, [example])
    for exchange in topology.exchanges:
        short = exchange.name[len(ns) + 1 :]
        channel_id = _channel_id(exchange.name, ns, "exchange")
        carried = _EXCHANGE_MESSAGES[short]
        channels[channel_id] = {
            "address": exchange.name,
            "title": f"exchange {exchange.name}",
            "description": _SENDERS[short][1],
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in carried},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange.name,
                        "type": str(exchange.type),
                        "durable": True,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        sender = _SENDERS[short][0]
        operations[f"{sender}_sends_{short}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"{sender}: {_SENDERS[short][1]}",
            "messages": _message_refs(channel_id, carried),
        }
    for queue in topology.queues:
        name = queue.name.replace(f".cap.{example}", f".cap.{CAPABILITY_PLACEHOLDER}")
        short = name[len(ns) + 1 :]
        match = next(q for q in _QUEUES if short == q[0] or (q[0].endswith(".") and short.startswith(q[0])))
        _, carried, consumer, what = match
        channel_id = _channel_id(name, ns, "queue")
        bound = sorted(
            {f"{b.exchange} ({b.routing_key or 'any'})" for b in topology.bindings if b.queue == queue.name}
        )
        channel: dict[str, Any] = {
            "address": name,
            "title": f"queue {name}",
            "description": f"{what} Bound to: {', '.join(bound) or 'nothing'}."
            + (f" Arguments: {queue.arguments_dict}." if queue.arguments else ""),
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in carried},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": name,
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
        if CAPABILITY_PLACEHOLDER in name:
            channel["parameters"] = {
                "capability": {"description": "A capability, [a-z0-9][a-z0-9_.-]{0,63}; one queue each."}
            }
        channels[channel_id] = channel
        operations[f"{consumer}_receives_{channel_id[len('queue_') :]}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"{consumer}: {what}",
            "messages": _message_refs(channel_id, carried),
        }
    # Replies go to each requester's own reply_to queue through the default exchange.
    replies = ["Accepted", "Rejected", "Completed", "QueryReply"]
    channels["reply_to"] = {
        "address": None,
        "title": "reply_to of a submission or query",
        "description": "Replies, through the default exchange to the requester's reply_to queue, with its "
        "correlation_id and in the content type of the request.",
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in replies},
    }
    operations["client_receives_replies"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/reply_to"},
        "summary": "client: the router's replies (accepted/rejected, then completed; query answers).",
        "messages": _message_refs("reply_to", replies),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "fabric",
            "version": __version__,
            "description": "A worker fabric over RabbitMQ: exchanges, queues and messages of the wire "
            f"contract (docs/protocol.md), in namespace {ns!r}. Generated by `fabric docs asyncapi`.",
        },
        "defaultContentType": "application/msgpack",
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The broker (FABRIC_AMQP_URL).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": components_messages, "schemas": schemas},
    }
