"""Warnings for someone waiting on a workflow: the capabilities it needs that no live agent serves.

Pure: it turns the router's ``why`` answers into warnings; ``fabric submit --wait`` asks ``why`` every
:data:`CHECK_INTERVAL_S` and prints what this returns, so a workflow that cannot progress says so at
once instead of waiting without a word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

#: How often a waiting submitter asks the router again (seconds).
CHECK_INTERVAL_S = 5.0

#: Routers that answer ``why`` without a ``capability`` field name it in the detail sentence.
_IN_DETAIL = re.compile(r"capability '([^']+)'")


@dataclass(frozen=True, slots=True)
class UnservedWarning:
    """One capability with no live agent, the waiting tasks that need it, and the sentence to show."""

    capability: str
    task_ids: tuple[str, ...]
    message: str


def unserved_warnings(answers: Iterable[Mapping[str, Any]], warned: Set[str]) -> list[UnservedWarning]:
    """One warning per capability that ``why`` reports as ``no_agent`` and that is not in ``warned``.

    Args:
        answers: the router's ``why`` answers for the workflow (see docs/protocol.md §7).
        warned: capabilities already warned about; the caller adds each returned one to it.

    Example:
        >>> [w.capability for w in unserved_warnings([{"task_id": "a", "reason": "no_agent",
        ...     "capability": "llm.summarize", "detail": "..."}], set())]
        ['llm.summarize']
    """
    tasks: dict[str, list[str]] = {}
    for answer in answers:
        if answer.get("reason") != "no_agent":
            continue
        capability = answer.get("capability")
        if not capability:
            found = _IN_DETAIL.search(str(answer.get("detail") or ""))
            capability = found.group(1) if found else "?"
        capability = str(capability)
        if capability not in warned:
            tasks.setdefault(capability, []).append(str(answer.get("task_id")))
    return [
        UnservedWarning(
            capability,
            tuple(task_ids),
            f"no live agent serves {capability!r} (task {', '.join(task_ids)} waits for one); "
            f"still waiting: start a worker that has this capability, or stop with Ctrl-C",
        )
        for capability, task_ids in tasks.items()
    ]
