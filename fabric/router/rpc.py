"""The router's queries (``{ns}.rpc``): a table of handlers by routing key, and typed refusals.

A query's routing key names its method; :class:`Rpc` looks the handler up in its table, calls it with
the decoded request (a map) and answers ``{"ok": true, "data": …}``. A handler "about a workflow"
gets the stored workflow too, and the answer is ``data: null`` when there is none. A handler refuses
by raising :class:`Refused` with an :class:`~fabric.protocol.rpc.RpcErrorType`; the exceptions the
router's operations raise are mapped once, by :func:`error_of`, so the wire ``error.type`` is always
one of that vocabulary and never a Python class name:

=======================  ===============
raised                   ``error.type``
=======================  ===============
:class:`Refused`         its own type
``ProtocolError``        ``invalid``
``KeyError``             ``not_found``
``ValueError``           ``conflict``
``StoreError``           ``unavailable``
anything else (a bug)    ``internal``
=======================  ===============
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fabric.errors import ProtocolError, StoreError, TransportError, message_of
from fabric.protocol import codec
from fabric.protocol.rpc import RpcErrorType
from fabric.store.base import WorkflowRecord
from fabric.transport.base import Delivery

log = logging.getLogger("fabric.router")

#: A query about the router or the fleet: called with the request.
Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]
#: A query about one workflow: called with the stored workflow and the request.
WorkflowHandler = Callable[[WorkflowRecord, Mapping[str, Any]], Awaitable[Any]]
#: Sends an answer: (reply_to, correlation_id, document, content type).
Reply = Callable[[str | None, str | None, dict[str, Any], str], Awaitable[None]]


class Refused(Exception):
    """A handler refuses the request: answered ``{"ok": false, "error": {"type", "message"}}``."""

    def __init__(self, type: RpcErrorType, message: str) -> None:
        super().__init__(message)
        self.type = type


def error_of(exc: BaseException) -> dict[str, str]:
    """The ``error`` of the answer to a query that raised ``exc`` (see the module's table)."""
    if isinstance(exc, Refused):
        kind = exc.type
    elif isinstance(exc, ProtocolError):  # before ValueError: a ProtocolError is one
        kind = RpcErrorType.INVALID
    elif isinstance(exc, KeyError):
        kind = RpcErrorType.NOT_FOUND
    elif isinstance(exc, ValueError):
        kind = RpcErrorType.CONFLICT
    elif isinstance(exc, StoreError):
        kind = RpcErrorType.UNAVAILABLE
    else:
        return {"type": str(RpcErrorType.INTERNAL), "message": f"{type(exc).__name__}: {exc}"}
    return {"type": str(kind), "message": message_of(exc)}


def param(request: Mapping[str, Any], key: str) -> str:
    """``request[key]`` as a string; refused ``invalid`` when it is missing (None)."""
    value = request.get(key)
    if value is None:
        raise Refused(RpcErrorType.INVALID, f"this request needs a {key}")
    return str(value)


def required(request: Mapping[str, Any], key: str) -> str:
    """The non-empty string ``request[key]``; refused ``invalid`` without one."""
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise Refused(RpcErrorType.INVALID, f"this request needs a {key}")
    return value


def optional(request: Mapping[str, Any], key: str) -> str | None:
    """``request[key]`` when given: a string or None; refused ``invalid`` otherwise."""
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise Refused(RpcErrorType.INVALID, f"{key} must be a string, not {type(value).__name__}")
    return value


class Rpc:
    """The table of queries, and how one is answered."""

    def __init__(
        self,
        get_workflow: Callable[[str], Awaitable[WorkflowRecord | None]],
        *,
        handlers: Mapping[str, Handler],
        about_workflow: Mapping[str, WorkflowHandler],
        reply: Reply,
    ) -> None:
        both = set(handlers) & set(about_workflow)
        if both:
            raise ValueError(f"queries in both tables: {', '.join(sorted(both))}")
        self._get_workflow = get_workflow
        self._handlers = dict(handlers)
        self._about_workflow = dict(about_workflow)
        self._reply = reply

    @property
    def methods(self) -> frozenset[str]:
        """Every routing key answered (the bindings of ``{ns}.router.rpc``)."""
        return frozenset(self._handlers) | frozenset(self._about_workflow)

    async def call(self, method: str, request: Mapping[str, Any]) -> Any:
        """The ``data`` of the answer; raises what the handler raised, or :class:`Refused`."""
        handler = self._handlers.get(method)
        if handler is not None:
            return await handler(request)
        about = self._about_workflow.get(method)
        if about is None:
            raise Refused(RpcErrorType.INVALID, f"unknown query {method!r}")
        workflow = await self._get_workflow(param(request, "workflow_id"))
        if workflow is None:
            return None
        return await about(workflow, request)

    async def answer(self, method: str, body: bytes, content_type: str | None) -> dict[str, Any]:
        """The answer document to one query, ok or not (a query loses nothing by an error answer)."""
        try:
            request = codec.decode(body, content_type or codec.MSGPACK) if body else {}
            if not isinstance(request, dict):
                raise ProtocolError("request must be a map")
            return {"ok": True, "data": await self.call(method, request)}
        except Exception as exc:
            error = error_of(exc)
            if error["type"] == RpcErrorType.INTERNAL:
                # A bug, or a request shape nothing foresaw: answered rather than requeued, as a
                # message that would fail the same way forever.
                log.exception("%s query failed", method)
            return {"ok": False, "error": error}

    async def on_delivery(self, delivery: Delivery) -> None:
        """Answer one query delivery, then ack it."""
        method = delivery.routing_key
        response = await self.answer(method, delivery.body, delivery.content_type)
        try:
            await self._reply(delivery.reply_to, delivery.correlation_id, response, codec.MSGPACK)
        except TransportError as exc:
            log.warning("could not answer %s query: %s", method, exc)
        await delivery.ack()
