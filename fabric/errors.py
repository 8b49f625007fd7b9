"""The one exception tree of fabric.

Third-party errors (aio-pika, redis, msgpack, sqlite) are translated into this tree at exactly one
boundary per dependency, always with ``raise ... from exc``::

    FabricError
     ├── ConfigError (ValueError)            a setting is missing or invalid
     ├── ProtocolError (ValueError)          bytes that are not a valid fabric message (keeps the raw bytes)
     ├── SubmissionRejected                  the router refused a submission (reason code + detail)
     ├── TopologyMismatch                    a queue/exchange exists with other arguments than expected
     ├── TransportError                      the broker connection or a publish failed
     │    └── PublishError                   a publish was nacked, returned or not confirmed in time
     │         └── Unroutable                a mandatory publish was returned: no queue is bound for it
     ├── StoreError                          the state store failed
     ├── NotConnectedError                   a lifecycle object was used before it was started
     ├── WorkflowNotFound                    no workflow with that id
     ├── RequestRefused                      the router refused a request (no such task, wrong state)
     ├── WaitTimeout (TimeoutError)          waiting for a result took longer than asked
     └── HandlerSignal                       control-flow signals raised by handlers; never logged as errors
          ├── Retry                          run this task again after ``delay_s``
          ├── Reassign                       run this task again on another agent
          ├── Escalate                       stop and alert an operator
          └── Abort                          park this task on the dead-letter queue with ``reason``
"""

from __future__ import annotations

from typing import Any


class FabricError(Exception):
    """Root of every error fabric raises."""


class ConfigError(FabricError, ValueError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class ProtocolError(FabricError, ValueError):
    """Bytes that cannot be decoded as a fabric message.

    Args:
        message: what is wrong.
        data: the raw payload, kept for dead-letter forensics.
    """

    def __init__(self, message: str, data: bytes | None = None) -> None:
        super().__init__(message)
        self.data = data


class SubmissionRejected(FabricError):
    """The router refused a submission.

    Args:
        reason: a reason code of docs/protocol.md §3 (``cycle``, ``invalid``, ...).
        detail: a human-readable explanation.
        errors: structured validation errors, if any.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        workflow_id: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.workflow_id = workflow_id
        self.errors = errors or []


class TopologyMismatch(FabricError):
    """A queue or exchange exists on the broker with other arguments than fabric expects."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail


class TransportError(FabricError):
    """The broker connection failed, or an operation on it did."""


class PublishError(TransportError):
    """A publish was not confirmed: nacked by the broker, returned as unroutable, or timed out."""

    def __init__(self, message: str, *, exchange: str = "", routing_key: str = "") -> None:
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key


class Unroutable(PublishError):
    """A mandatory publish came back (basic.return): no queue is bound to ``exchange`` for ``routing_key``.

    The broker dropped nothing silently: the message was not taken. A caller that declared the queue
    itself can declare it again (someone deleted it) and publish once more.

    Example:
        >>> try:
        ...     await amqp.publish(exchange, capability, body)
        ... except Unroutable:
        ...     await amqp.declare(spec.capability(ns, capability))
    """


class StoreError(FabricError):
    """The state store failed."""


class NotConnectedError(FabricError):
    """A lifecycle object was used outside ``async with`` (or after it was closed)."""


class WorkflowNotFound(FabricError):
    """No workflow with this id is known to the router."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"no workflow with id {workflow_id!r}")
        self.workflow_id = workflow_id


class RequestRefused(FabricError):
    """The router understood a request and refused it: no such task, or a task in the wrong state for
    the command (resuming a task that is not escalated, replaying one that is not dead...).

    Args:
        message: the router's explanation.
        error_type: the kind of refusal, as the router's answer names it (docs/protocol.md §7):
            ``not_found`` (no such task), ``conflict`` (not possible in the task's state now) or
            ``invalid`` (the request is malformed).
    """

    def __init__(self, message: str, *, error_type: str = "conflict") -> None:
        super().__init__(message)
        self.error_type = error_type

    @property
    def not_found(self) -> bool:
        """True when what the request named does not exist."""
        return self.error_type in ("not_found", "KeyError")


def message_of(exc: BaseException) -> str:
    """The message of ``exc`` to show a caller: a KeyError's argument itself (its ``str()`` is the repr
    of the argument, quotes and all), any other exception's ``str()``."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


class WaitTimeout(FabricError, TimeoutError):
    """Waiting for a reply or a result took longer than the caller allowed."""


class HandlerSignal(FabricError):
    """Control-flow signals a handler raises to choose its task's fate; not errors."""


class Retry(HandlerSignal):
    """Run the task again after ``delay_s`` seconds (rounded to a delay tier)."""

    def __init__(self, message: str = "retry requested", *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Reassign(HandlerSignal):
    """Run the task again on another agent."""


class Escalate(HandlerSignal):
    """Stop retrying and alert an operator."""


class Abort(HandlerSignal):
    """Park the task on the dead-letter queue with ``reason``."""

    def __init__(self, reason: str = "aborted") -> None:
        super().__init__(reason)
        self.reason = reason
