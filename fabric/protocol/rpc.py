"""The error vocabulary of the router's query answers (``{ns}.rpc``, docs/protocol.md §7).

An answer is ``{"ok": true, "data": …}`` or ``{"ok": false, "error": {"type", "message"}}``; the
``type`` is one of :class:`RpcErrorType`, a stable name of what went wrong, never the class name of
an exception inside the router. Routers before this vocabulary sent Python class names
(``KeyError`` …): :func:`error_type` reads both, so a client works with routers of either version.

Example:
    >>> error_type("not_found"), error_type("KeyError")
    (<RpcErrorType.NOT_FOUND: 'not_found'>, <RpcErrorType.NOT_FOUND: 'not_found'>)
"""

from __future__ import annotations

import enum


class RpcErrorType(enum.StrEnum):
    """The ``error.type`` of a query answer."""

    #: What the request named does not exist (a task of the workflow).
    NOT_FOUND = "not_found"
    #: The request itself is malformed: no ``workflow_id``, a ``reason`` that is not a string, an
    #: ``input`` over the size limit, an unknown query.
    INVALID = "invalid"
    #: Refused in the task's current state (resuming a task that is not escalated …); the message says why.
    CONFLICT = "conflict"
    #: The router's state store could not answer now: ask again.
    UNAVAILABLE = "unavailable"
    #: A bug in the router, answered rather than requeued (the router logs it with its traceback).
    INTERNAL = "internal"

    @property
    def refusal(self) -> bool:
        """The router understood the request and refused it (not a failure to answer)."""
        return self in (RpcErrorType.NOT_FOUND, RpcErrorType.INVALID, RpcErrorType.CONFLICT)


#: The ``error.type`` routers before :class:`RpcErrorType` sent (Python class names), and what each means.
LEGACY_ERROR_TYPES: dict[str, RpcErrorType] = {
    "KeyError": RpcErrorType.NOT_FOUND,
    "ValueError": RpcErrorType.CONFLICT,
    "ProtocolError": RpcErrorType.INVALID,
    "StoreError": RpcErrorType.UNAVAILABLE,
    "InternalError": RpcErrorType.INTERNAL,
}


def error_type(raw: object) -> RpcErrorType | None:
    """The type of a received ``error.type``, in either vocabulary; None for one neither knows."""
    if not isinstance(raw, str):
        return None
    try:
        return RpcErrorType(raw)
    except ValueError:
        return LEGACY_ERROR_TYPES.get(raw)
