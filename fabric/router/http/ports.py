"""What the HTTP layer needs from the router, and nothing more: four narrow parts.

The HTTP modules see the router only through these Protocols (:class:`Parts` bundles them), so they
never import :mod:`fabric.router.service` (an import-linter contract holds it) and can be served on
fakes. The router wires itself, and its store, into a :class:`Parts`.

* :class:`Intake`: the one admission path of AMQP and HTTP submissions.
* :class:`Operator`: why, cancel, resume, abort.
* :class:`Monitoring`: agents, queue depths, counters, alerts, whether this router is active.
* :class:`ReadStore`: the reads of the state store the API pages through (no writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Set
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from fabric.protocol.messages import Accepted, Alert, Rejected
from fabric.router.admission import Refusal
from fabric.settings import FabricSettings
from fabric.store.base import DeadQuery, Page, Sample, TaskRecord, WorkflowQuery, WorkflowRecord


class Outcome(Protocol):
    """How a submission was decided."""

    @property
    def reply(self) -> Accepted | Rejected:
        """The ``accepted`` or ``rejected`` reply."""
        ...

    @property
    def resent(self) -> bool:
        """The workflow existed already: an idempotent resend, nothing was created."""
        ...


class Intake(Protocol):
    """Submissions: the path AMQP submissions take (same admission, rejections and idempotency)."""

    def count_submission(self) -> None:
        """Count one submission received (the ``submissions`` counter of ``/stats``)."""
        ...

    def http_span(
        self, method: str, route: str, request_headers: Mapping[str, str]
    ) -> AbstractContextManager[None]:
        """A SERVER span for the request, under the client's ``traceparent`` when it sent one."""
        ...

    async def submit(
        self, body: bytes, content_type: str | None, *, message_id: str | None, notify_tasks: bool = False
    ) -> Outcome:
        """Admit a submission; an accepted workflow is stored and its ready tasks confirmed first.

        Raises:
            StoreError, TransportError: nothing was decided; the client asks again.
        """
        ...

    async def refuse(self, message_id: str | None, refusal: Refusal, content_type: str | None) -> Outcome:
        """Refuse a submission found bad before admission (a body over the size limit)."""
        ...


class Operator(Protocol):
    """What an operator asks about or does to a workflow (as ``fabric why/cancel/resume/abort``).

    Each raises KeyError when there is no such workflow or task; resume and abort raise ValueError
    when the task is not escalated, resume ProtocolError when the new input is too large.
    """

    async def why(self, workflow_id: str, task_id: str | None = None) -> list[dict[str, Any]]: ...

    async def cancel(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]: ...

    async def resume(self, workflow_id: str, task_id: str, **new: Any) -> dict[str, Any]: ...

    async def abort(self, workflow_id: str, task_id: str, reason: str | None = None) -> dict[str, Any]: ...


class Monitoring(Protocol):
    """What the router knows of itself, the agents and the queues (read only)."""

    @property
    def ns(self) -> str:
        """The namespace the router serves."""
        ...

    @property
    def active(self) -> bool:
        """This router consumes submissions and events (the others are standbys)."""
        ...

    @property
    def started_at(self) -> float:
        """When this router started, in seconds since the epoch."""
        ...

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the router stops: live streams end."""
        ...

    @property
    def published_capabilities(self) -> Set[str]:
        """Capabilities this router has published tasks to since it started."""
        ...

    def counters(self) -> dict[str, int]:
        """What this router did since it started (a copy)."""
        ...

    def totals(self) -> dict[str, int]:
        """Task and workflow totals since it started, as its metrics count them (a copy)."""
        ...

    def firing_alerts(self) -> list[Alert]:
        """The alerts firing now, oldest first."""
        ...

    async def agents(self) -> list[dict[str, Any]]:
        """Every agent seen, with its state."""
        ...

    async def queue_depths(self, capabilities: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``queue``, ``messages`` and ``consumers`` of each capability's queue that exists."""
        ...

    async def dead_queue_depth(self) -> dict[str, Any] | None:
        """The parking queue's ``queue``, ``messages`` and ``consumers``, or None."""
        ...


class ReadStore(Protocol):
    """The reads of the state store the HTTP layer makes (a :class:`~fabric.store.StateStore` is one)."""

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None: ...

    async def get_tasks(
        self, workflow_id: str, task_ids: Iterable[str] | None = None
    ) -> dict[str, TaskRecord]: ...

    async def query_workflows(
        self, query: WorkflowQuery = ..., *, limit: int = 50, cursor: str | None = None
    ) -> Page[WorkflowRecord]: ...

    async def query_dead(
        self, query: DeadQuery = ..., *, limit: int = 50, cursor: str | None = None
    ) -> Page[TaskRecord]: ...

    async def escalated(self, limit: int = 100) -> list[TaskRecord]: ...

    async def samples(self, since: float) -> list[Sample]: ...


@dataclass(frozen=True)
class Parts:
    """Everything the HTTP layer is given."""

    settings: FabricSettings
    intake: Intake
    operator: Operator
    monitoring: Monitoring
    store: ReadStore
