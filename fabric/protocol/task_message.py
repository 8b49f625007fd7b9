"""The task message (docs/protocol.md §4): one model for the router that publishes it and the worker that
reads it and sends its copies on (retried, reassigned, handed on, parked).

Pure: no I/O and no clock. The times a copy carries are passed in (``now_ms``), so what goes on the wire
is a function of its arguments.

The header table is kept whole: headers this module does not name (trace context, a newer router's)
travel on with every copy, as the wire contract asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fabric.errors import ProtocolError
from fabric.protocol import codec, headers

#: How much of the last error a copy carries in ``fabric-last-error``.
LAST_ERROR_MAX = 1000


@dataclass(frozen=True)
class TaskMessage:
    """A task message: its header table, body bytes and the AMQP properties a copy keeps.

    Build the router's message with :meth:`new`, read a delivered one with :meth:`received`, derive
    copies with :meth:`retried`, :meth:`reassigned`, :meth:`handed_on` and :meth:`parked`, and publish
    ``message.body`` with ``**message.properties()``.
    """

    headers: Mapping[str, Any]
    body: bytes
    message_id: str | None
    priority: int = 0
    content_type: str = codec.MSGPACK
    #: Set on a retried copy: how long it waits in its delay queue.
    expiration_s: float | None = field(default=None)

    # -- building and reading ---------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        *,
        workflow_id: str,
        task_id: str,
        attempt: int,
        max_attempts: int,
        on_exhausted: str,
        timeout_s: float | None,
        input: Any,
        upstream: Mapping[str, Any],
        priority: int,
        dispatched_at_ms: int,
    ) -> TaskMessage:
        """The message of ``attempt`` as the router publishes it."""
        table: dict[str, Any] = {
            headers.WORKFLOW_ID: workflow_id,
            headers.TASK_ID: task_id,
            headers.ATTEMPT: attempt,
            headers.MAX_ATTEMPTS: max_attempts,
            headers.AVOID: [],
            headers.DISPATCHED_AT_MS: dispatched_at_ms,
            headers.ON_EXHAUSTED: on_exhausted,
        }
        if timeout_s is not None:
            table[headers.TIMEOUT_S] = timeout_s
        return cls(
            headers=table,
            body=codec.encode({"input": input, "upstream": upstream}),
            message_id=attempt_id(workflow_id, task_id, attempt),
            priority=priority,
        )

    @classmethod
    def received(
        cls,
        table: Mapping[str, Any] | None,
        body: bytes,
        *,
        message_id: str | None,
        priority: int,
        content_type: str | None,
    ) -> TaskMessage:
        """A delivered task message (a body without a content type is msgpack, as fabric sends it)."""
        return cls(
            headers=dict(table or {}),
            body=body,
            message_id=message_id,
            priority=priority,
            content_type=content_type or codec.MSGPACK,
        )

    @property
    def workflow_id(self) -> str:
        return headers.get_str(self.headers, headers.WORKFLOW_ID)

    @property
    def task_id(self) -> str:
        return headers.get_str(self.headers, headers.TASK_ID)

    @property
    def attempt(self) -> int:
        """1-based attempt number (1 when absent)."""
        return headers.get_int(self.headers, headers.ATTEMPT, 1)

    @property
    def max_attempts(self) -> int:
        return headers.get_int(self.headers, headers.MAX_ATTEMPTS, 1)

    @property
    def timeout_s(self) -> float | None:
        return headers.get_float(self.headers, headers.TIMEOUT_S, None)

    @property
    def avoid(self) -> list[str]:
        """Agents that failed the task and should not get it again."""
        return headers.get_list(self.headers, headers.AVOID)

    @property
    def bounces(self) -> int:
        return headers.get_int(self.headers, headers.BOUNCES, 0)

    @property
    def must_avoid(self) -> bool:
        """A handler's ``Reassign``: the agents in :attr:`avoid` must not run it (exactly ``"true"``)."""
        return headers.get_str(self.headers, headers.MUST_AVOID) == "true"

    @property
    def on_exhausted(self) -> str:
        """The raw ``fabric-on-exhausted`` header ("" when absent); the reader validates it."""
        return headers.get_str(self.headers, headers.ON_EXHAUSTED)

    @property
    def dispatched_at_ms(self) -> int:
        """When the task became ready to run (0 when absent)."""
        return headers.get_int(self.headers, headers.DISPATCHED_AT_MS, 0)

    @property
    def previous_attempt(self) -> str:
        return headers.get_str(self.headers, headers.PREVIOUS_ATTEMPT)

    @property
    def links(self) -> dict[str, str]:
        return headers.get_table(self.headers, headers.LINKS)

    def payload(self) -> tuple[Any, dict[str, Any]]:
        """The body's ``input`` and ``upstream``.

        Raises:
            ProtocolError: the body is not a map in its content type.
        """
        body = codec.decode(self.body, self.content_type)
        if not isinstance(body, dict):
            raise ProtocolError("task body must be a map with 'input' and 'upstream'", self.body)
        return body.get("input"), dict(body.get("upstream") or {})

    def properties(self) -> dict[str, Any]:
        """Keyword arguments of a publish of this message (besides exchange, routing key and body)."""
        result: dict[str, Any] = {
            "headers": dict(self.headers),
            "content_type": self.content_type,
            "message_id": self.message_id,
            "priority": self.priority,
        }
        if self.expiration_s is not None:
            result["expiration_s"] = self.expiration_s
        return result

    # -- copies -----------------------------------------------------------------------------------

    def traced(
        self, context: Mapping[str, Any], *, links: Mapping[str, str] | None, previous_attempt: str | None
    ) -> TaskMessage:
        """With tracing: the trace context of its publish, the spans of its other dependencies and the
        span of the attempt before it."""
        table = {**self.headers, **context}
        if links:
            table[headers.LINKS] = dict(links)
        if previous_attempt:
            table[headers.PREVIOUS_ATTEMPT] = previous_attempt
        return replace(self, headers=table)

    def handed_on(self) -> TaskMessage:
        """The same attempt back to its queue for another agent: one more hand-over counted."""
        return self._with({headers.BOUNCES: self.bounces + 1})

    def reassigned(self, agent_id: str, *, now_ms: int, previous_attempt: str | None) -> TaskMessage:
        """The next attempt, at once, on any agent but ``agent_id`` (a handler's ``Reassign``)."""
        avoid = self.avoid
        return self._next(
            {
                headers.AVOID: avoid if agent_id in avoid else [*avoid, agent_id],
                headers.ATTEMPT: self.attempt + 1,
                headers.MUST_AVOID: "true",
                headers.BOUNCES: 0,
                headers.DISPATCHED_AT_MS: now_ms,
            },
            previous_attempt,
        )

    def retried(
        self,
        *,
        tier: str | None,
        delay_ms: int,
        last_error: str,
        avoid: str | None,
        now_ms: int,
        previous_attempt: str | None,
    ) -> TaskMessage:
        """The next attempt, through ``{ns}.retry`` into delay tier ``tier`` for ``delay_ms``; preferably
        not on agent ``avoid`` (None: nobody new to avoid)."""
        avoided = self.avoid
        if avoid is not None and avoid not in avoided:
            avoided = [*avoided, avoid]
        copy = self._next(
            {
                headers.DELAY: tier,
                headers.ATTEMPT: self.attempt + 1,
                headers.AVOID: avoided,
                headers.BOUNCES: 0,
                headers.LAST_ERROR: last_error[:LAST_ERROR_MAX],
                # Ready again once the delay is over: the next attempt's queue wait counts from then.
                headers.DISPATCHED_AT_MS: now_ms + delay_ms,
            },
            previous_attempt,
        )
        return replace(copy, expiration_s=delay_ms / 1000)

    def parked(
        self, *, reason: str, last_error: str, routing_key: str, agent_id: str, now_ms: int
    ) -> TaskMessage:
        """The copy parked on ``{ns}.dead``: why, its last error, its route and who parked it. A dead
        message has no priority."""
        table = headers.parked(
            self.headers,
            reason=reason,
            last_error=last_error,
            routing_key=routing_key,
            at_ms=now_ms,
            **{headers.AGENT_ID: agent_id},
        )
        return replace(self, headers=table, priority=0, expiration_s=None)

    def _with(self, changes: Mapping[str, Any]) -> TaskMessage:
        return replace(self, headers={**self.headers, **changes}, expiration_s=None)

    def _next(self, changes: Mapping[str, Any], previous_attempt: str | None) -> TaskMessage:
        table = {**self.headers, **changes}
        if previous_attempt is not None:
            table[headers.PREVIOUS_ATTEMPT] = previous_attempt
        attempt = self.attempt + 1
        return replace(
            self,
            headers=table,
            message_id=attempt_id(self.workflow_id, self.task_id, attempt),
            expiration_s=None,
        )


def attempt_id(workflow_id: str, task_id: str, attempt: int) -> str:
    """The ``message_id`` of a task message: ``<workflow_id>/<task_id>/<attempt>``."""
    return f"{workflow_id}/{task_id}/{attempt}"
