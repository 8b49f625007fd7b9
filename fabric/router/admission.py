"""Admission of a submission: decode, validate, build the graph, make the records. Pure: no I/O.

Every way a submission can be refused ends in :class:`Refusal`, carrying a reason code of docs/protocol.md §3.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fabric.errors import ProtocolError
from fabric.protocol import codec
from fabric.protocol.messages import RejectReason, Submission, TaskStatus, WorkflowStatus
from fabric.router.graph import GraphError, build_graph
from fabric.settings import PolicySettings
from fabric.store.base import TaskRecord, WorkflowRecord

#: Namespace of workflow ids derived from a submission's message_id (uuid5), so a redelivered or
#: republished message maps to the same workflow.
_MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c2a4e-5b7d-4c1e-9a3f-2d8e7b6a5c40")


@dataclass(eq=False)
class Refusal(Exception):
    """A submission the router will not run."""

    reason: RejectReason
    detail: str
    workflow_id: str | None = None
    errors: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Admitted:
    """A valid submission turned into the records to store."""

    workflow: WorkflowRecord
    tasks: list[TaskRecord]

    @property
    def ready(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status is TaskStatus.QUEUED]


def admit(
    body: bytes,
    content_type: str | None,
    *,
    message_id: str | None,
    reply_to: str | None,
    correlation_id: str | None,
    max_body_bytes: int,
    max_tasks: int,
    default_max_attempts: int,
    policy: PolicySettings | None = None,
) -> Admitted:
    """Turn a raw submission into workflow and task records.

    Raises:
        Refusal: with the reason code and a detail naming the problem.
    """
    # Admission allocates several objects per task and frees none: the cyclic garbage collector would
    # rescan them again and again (half the time of a 100,000-task workflow) for nothing to collect.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _admit(
            body,
            content_type,
            message_id=message_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            max_body_bytes=max_body_bytes,
            max_tasks=max_tasks,
            default_max_attempts=default_max_attempts,
            policy=policy or PolicySettings(),
        )
    finally:
        if enabled:
            gc.enable()


def _admit(
    body: bytes,
    content_type: str | None,
    *,
    message_id: str | None,
    reply_to: str | None,
    correlation_id: str | None,
    max_body_bytes: int,
    max_tasks: int,
    default_max_attempts: int,
    policy: PolicySettings,
) -> Admitted:
    kind = codec.normalize_content_type(content_type)
    if kind is None:
        raise Refusal(
            RejectReason.UNSUPPORTED_CONTENT_TYPE,
            f"content_type {content_type!r} is not supported; use application/json or application/msgpack",
        )
    if len(body) > max_body_bytes:
        raise too_large(f"{len(body)} bytes", max_body_bytes)
    try:
        data = codec.decode(body, kind)
    except ProtocolError as exc:
        raise Refusal(RejectReason.MALFORMED, str(exc)) from exc
    if not isinstance(data, dict):
        raise Refusal(RejectReason.MALFORMED, f"body must be a map/object, not {type(data).__name__}")
    raw_id = data.get("workflow_id")
    hinted_id = raw_id if isinstance(raw_id, str) else None
    try:
        submission = Submission.model_validate(data)
    except ValidationError as exc:
        errors = tuple(
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        )
        summary = "; ".join(f"{e['loc'] or '(body)'}: {e['msg']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise Refusal(RejectReason.INVALID, summary + more, hinted_id, errors) from exc
    if len(submission.tasks) > max_tasks:
        raise Refusal(
            RejectReason.INVALID,
            f"workflow has {len(submission.tasks)} tasks; the limit is {max_tasks}",
            submission.workflow_id,
        )
    if kind == codec.JSON:
        # JSON numbers are unbounded; the store and the task messages are msgpack, which is not.
        try:
            codec.encode(data)
        except ProtocolError as exc:
            raise Refusal(
                RejectReason.INVALID, f"a value cannot be carried: {exc}", submission.workflow_id
            ) from exc
    try:
        graph = build_graph(submission.tasks)
    except GraphError as exc:
        raise Refusal(exc.reason, exc.detail, submission.workflow_id) from exc

    workflow_id = submission.workflow_id or _derive_workflow_id(message_id)
    now = time.time()
    tasks = []
    for spec in submission.tasks:
        ready = not spec.depends_on
        tasks.append(
            TaskRecord(
                workflow_id=workflow_id,
                task_id=spec.id,
                capability=spec.capability,
                input=spec.input,
                depends_on=list(dict.fromkeys(spec.depends_on)),
                dependents=list(graph.successors(spec.id)),
                pending_deps=graph.in_degree(spec.id),
                priority=spec.priority,
                timeout_s=spec.timeout_s,
                max_attempts=policy.max_attempts_for(
                    spec.capability, spec.max_attempts, default_max_attempts
                ),
                on_exhausted=str(policy.on_exhausted_for(spec.capability, spec.on_exhausted)),
                status=TaskStatus.QUEUED if ready else TaskStatus.WAITING,
                created_at=now,
                queued_at=now if ready else None,
            )
        )
    workflow = WorkflowRecord(
        workflow_id=workflow_id,
        fingerprint=fingerprint(data),
        task_count=len(tasks),
        remaining=len(tasks),
        status=WorkflowStatus.RUNNING,
        metadata=dict(submission.metadata),
        content_type=kind,
        reply_to=reply_to,
        correlation_id=correlation_id,
        message_id=message_id,
        created_at=now,
        capabilities=sorted({t.capability for t in tasks}),
    )
    return Admitted(workflow, tasks)


def too_large(size: str, max_body_bytes: int) -> Refusal:
    """The refusal of a body over the limit; ``size`` says how big it is (e.g. ``"5000 bytes"``)."""
    return Refusal(RejectReason.TOO_LARGE, f"body is {size}; the limit is {max_body_bytes}")


def fingerprint(data: dict[str, Any]) -> str:
    """A digest of what a submission asks for, to tell a resend from a conflicting reuse of an id.

    Computed on the decoded body (keys sorted, ``workflow_id`` left out), so the same workflow sent as
    JSON or msgpack, with keys in any order, has the same fingerprint.
    """
    doc = {k: v for k, v in data.items() if k != "workflow_id"}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _derive_workflow_id(message_id: str | None) -> str:
    if message_id:
        return f"wf-{uuid.uuid5(_MESSAGE_ID_NAMESPACE, message_id).hex}"
    return f"wf-{uuid.uuid4().hex}"
