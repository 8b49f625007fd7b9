"""Failure policy: pure decisions about a failed attempt. No I/O.

The worker asks :meth:`FailurePolicy.decide` what to do with every failed attempt (handler error,
timeout, explicit signal) and carries the decision out. Today's default, :class:`FailFast`, ends the task
as ``failed`` with its error; the retry/reassign/escalate/abort policy of DESIGN.md §8 plugs in here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from fabric.protocol.messages import ErrorInfo


class Action(enum.StrEnum):
    """What happens to a failed attempt."""

    FAIL = "fail"
    RETRY = "retry"
    REASSIGN = "reassign"
    ESCALATE = "escalate"
    ABORT = "abort"


@dataclass(frozen=True)
class Decision:
    action: Action
    error: ErrorInfo
    delay_s: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Failure:
    """A failed attempt as the policy sees it."""

    error: ErrorInfo
    attempt: int
    max_attempts: int
    capability: str
    #: The control-flow signal the handler raised (``Retry``, ``Abort``...), by class name, if any.
    signal: str | None = None


class FailurePolicy(Protocol):
    def decide(self, failure: Failure) -> Decision: ...


class FailFast:
    """Every failure ends the task as ``failed`` with its error recorded."""

    def decide(self, failure: Failure) -> Decision:
        return Decision(Action.FAIL, failure.error)
