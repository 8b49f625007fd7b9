"""A task's history: typed entries, and the one notion of an *attempt epoch*. Pure, no I/O.

The store keeps a task's history as a list of plain dicts (``TaskRecord.history``; docs/protocol.md
shows them in ``fabric status``). This module is the only one that writes or reads their shape:

* :class:`Failure`: a failed attempt, ``{"attempt", "agent", "error", "at"}``, with ``"lapsed": True``
  once the router gave that attempt up because its lease lapsed;
* :class:`Late`: what an attempt older than the current one reported, ``{"attempt", "agent", "late",
  "error", "at"}``;
* :class:`OperatorAction`: a replay, a resume (with its new ``input``, if any) or an abort,
  ``{"attempt", "agent": "operator", "error": {"type", "message"}, "at"}``.

An operator entry is the one reset marker: a replayed or resumed task counts its attempts from 1 again,
so only the entries after the last operator entry (the current *epoch*) speak of the attempts it runs
now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from fabric.protocol.messages import TaskEvent

#: Entries remembered per task at most (the first ones and the latest ones are kept).
MAX_HISTORY = 20
#: The agent of the entries an operator's replay, resume or abort adds.
OPERATOR: Final = "operator"

#: The operator actions, as the ``error.type`` of their entries.
OperatorKind = Literal["Replayed", "Resumed", "Aborted"]

#: A stored history entry (the dict form kept in ``TaskRecord.history``).
Stored = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt of the current epoch (``lapsed``: the router gave it up, its lease lapsed)."""

    attempt: int
    agent: str
    error: dict[str, Any]
    at: float
    lapsed: bool = False

    def encode(self) -> Stored:
        entry: Stored = {"attempt": self.attempt, "agent": self.agent, "error": self.error, "at": self.at}
        if self.lapsed:
            entry["lapsed"] = True
        return entry


@dataclass(frozen=True, slots=True)
class Late:
    """What a stale attempt reported (``status``: the event's status) after the task moved on."""

    attempt: int
    agent: str
    status: str
    error: dict[str, Any] | None
    at: float

    def encode(self) -> Stored:
        return {
            "attempt": self.attempt,
            "agent": self.agent,
            "late": self.status,
            "error": self.error,
            "at": self.at,
        }


#: The ``input`` of an operator entry that did not replace the task's input.
_NO_INPUT: Any = object()


@dataclass(frozen=True, slots=True)
class OperatorAction:
    """An operator's replay, resume or abort: it starts a new attempt epoch."""

    attempt: int
    kind: str
    message: str
    at: float
    input: Any = _NO_INPUT

    @property
    def new_input(self) -> bool:
        return self.input is not _NO_INPUT

    def encode(self) -> Stored:
        entry: Stored = {
            "attempt": self.attempt,
            "agent": OPERATOR,
            "error": {"type": self.kind, "message": self.message},
            "at": self.at,
        }
        if self.new_input:
            entry["input"] = self.input
        return entry


Entry = Failure | Late | OperatorAction


def decode(entry: Mapping[str, Any]) -> Entry:
    """The typed form of a stored entry (lenient: fields missing from older records are defaulted).

    Example:
        >>> decode({"attempt": 1, "agent": "operator", "error": {"type": "Resumed", "message": ""}}).kind
        'Resumed'
    """
    attempt, agent, at = (
        int(entry.get("attempt") or 0),
        str(entry.get("agent") or ""),
        float(entry.get("at") or 0),
    )
    error = entry.get("error")
    if agent == OPERATOR:
        error = error or {}
        return OperatorAction(
            attempt,
            str(error.get("type", "")),
            str(error.get("message", "")),
            at,
            entry.get("input", _NO_INPUT),
        )
    if "late" in entry:
        return Late(attempt, agent, str(entry["late"]), error, at)
    return Failure(attempt, agent, error or {}, at, bool(entry.get("lapsed")))


def is_reset(entry: Mapping[str, Any]) -> bool:
    """Whether a stored entry starts a new attempt epoch (an operator's action)."""
    return entry.get("agent") == OPERATOR


def epoch_start(history: Sequence[Mapping[str, Any]]) -> int:
    """The index of the first entry after the last operator entry (0 when there is none)."""
    for index in range(len(history) - 1, -1, -1):
        if is_reset(history[index]):
            return index + 1
    return 0


def attempt_epoch(history: list[Stored]) -> list[Stored]:
    """The entries of ``history`` since an operator last acted on the task (a replay, a resume or an
    abort): a replayed or resumed task counts its attempts from 1 again, so only these entries speak of
    the attempts it runs now.

    Example:
        >>> attempt_epoch([{"attempt": 1, "agent": "w1"}, {"attempt": 1, "agent": "operator"}])
        []
    """
    return history[epoch_start(history) :]


def trim_history(history: list[Stored]) -> None:
    """Keep ``history`` within :data:`MAX_HISTORY` entries: drop one from the middle (the first entries
    say how it began, the last how it goes), never the operator entry the current epoch counts from.

    Example:
        >>> history = [{"attempt": 1, "agent": "w"}] * MAX_HISTORY + [{"attempt": 1, "agent": "operator"}]
        >>> trim_history(history)
        >>> len(history), history[-1]["agent"]
        (20, 'operator')
    """
    if len(history) <= MAX_HISTORY:
        return
    middle = MAX_HISTORY // 2
    if epoch_start(history) == middle + 1:
        middle += 1  # the middle entry starts the current epoch: the one after it goes
    del history[middle]


def lapsed_attempts(history: list[Stored]) -> set[int]:
    """Attempts of the current epoch the router gave up (a replay or resume counts from 1 again)."""
    return {int(entry["attempt"]) for entry in attempt_epoch(history) if entry.get("lapsed")}


def remember_failure(history: list[Stored], event: TaskEvent) -> None:
    """Add a failed attempt to the history, once per attempt of the current epoch, bounded."""
    if any(entry.get("attempt") == event.attempt for entry in attempt_epoch(history)):
        return
    assert event.error is not None
    history.append(Failure(event.attempt, event.agent_id, event.error.model_dump(), event.at).encode())
    trim_history(history)


def remember_late(history: list[Stored], event: TaskEvent) -> None:
    """Record what a stale attempt reported, once per attempt and status, bounded like failures."""
    status = str(event.status)
    if any(e.get("attempt") == event.attempt and e.get("late") == status for e in attempt_epoch(history)):
        return
    error = event.error.model_dump() if event.error is not None else None
    history.append(Late(event.attempt, event.agent_id, status, error, event.at).encode())
    trim_history(history)


def mark_lapsed(history: list[Stored], attempt: int) -> None:
    """Mark ``attempt`` of the current epoch as given up by the router (its lease lapsed)."""
    for entry in attempt_epoch(history):
        if entry.get("attempt") == attempt:
            entry["lapsed"] = True


def operator_entry(attempt: int, kind: OperatorKind, message: str, at: float, **new: Any) -> Stored:
    """The stored entry of an operator's action; ``input=...`` when a resume replaced the input.

    Example:
        >>> operator_entry(2, "Aborted", "no", 9.0)
        {'attempt': 2, 'agent': 'operator', 'error': {'type': 'Aborted', 'message': 'no'}, 'at': 9.0}
    """
    return OperatorAction(attempt, kind, message, at, new.get("input", _NO_INPUT)).encode()
