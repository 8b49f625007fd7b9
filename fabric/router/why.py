"""Why a task does not run, or where it runs: pure decisions for ``fabric why`` (:func:`explain`).

The shell reads the workflow's tasks, the live agents (:func:`serving`) and the depth of each queue
a selected task waits in (:func:`queues_to_read`), and :func:`explain` answers from those alone.

A task waits in its capability queue when it is ``queued``, and also when it is ``retrying`` but its
next attempt is due: the delay queue has handed it back (or the handler reassigned it, which has no
delay). Whether anyone will take it depends on the capability's live agents, as their heartbeats tell:

- ``no_agent``: no live agent serves the capability;
- ``circuit_open``: every live agent that serves it has its circuit breaker open (or half-open: it
  takes one probe task at a time);
- ``queued``: otherwise; agents the stall watchdog marked are named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.protocol.messages import TaskStatus
from fabric.store.base import AgentRecord, TaskRecord

#: The breaker state of an agent whose heartbeat does not mention the capability.
_CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Serving:
    """The live agents of one capability, as their heartbeats say.

    Example:
        >>> Serving(breakers={"a@h:1": "open"}).all_tripped
        True
    """

    #: Each live agent's circuit breaker state for this capability.
    breakers: Mapping[str, str]
    #: Live agents the stall watchdog marked as not consuming this capability although work waits.
    stalled: tuple[str, ...] = field(default=())

    @property
    def agents(self) -> list[str]:
        return list(self.breakers)

    @property
    def all_tripped(self) -> bool:
        """True when every live agent's breaker for the capability is not closed."""
        return bool(self.breakers) and all(state != _CLOSED for state in self.breakers.values())


def serving(agents: Iterable[AgentRecord]) -> dict[str, Serving]:
    """Who serves each capability, from the live agents' records (lost agents left out by the caller).

    Example:
        >>> serving(live_agents)["demo.echo"].agents
        ['demo@h:1']
    """
    breakers: dict[str, dict[str, str]] = {}
    stalled: dict[str, list[str]] = {}
    for agent in agents:
        for capability in agent.capabilities:
            breakers.setdefault(capability, {})[agent.agent_id] = agent.breakers.get(capability, _CLOSED)
            if capability in agent.unhealthy:
                stalled.setdefault(capability, []).append(agent.agent_id)
    return {cap: Serving(states, tuple(stalled.get(cap, ()))) for cap, states in breakers.items()}


def in_queue(task: TaskRecord, now: float) -> bool:
    """True when the task waits in its capability queue: queued, or retrying with its attempt due.

    A reassigned task (``retrying`` without ``retry_at``) goes back to the queue at once.
    """
    if task.status is TaskStatus.QUEUED:
        return True
    return task.status is TaskStatus.RETRYING and (task.retry_at is None or task.retry_at <= now)


def why_queued(task: TaskRecord, *, depth: int, who: Serving | None) -> dict[str, Any]:
    """The answer for a task in its capability queue (see :func:`in_queue`): reason, detail and facts.

    Args:
        task: the task, ``queued`` or ``retrying`` with its attempt due.
        depth: messages in the capability queue now.
        who: the capability's live agents; None when no live agent serves it.

    Example:
        >>> why_queued(task, depth=3, who=None)["reason"]
        'no_agent'
    """
    cap = task.capability
    prefix = ""
    if task.status is TaskStatus.RETRYING:
        error = task.error or {}
        prefix = (
            f"attempt {task.attempts} failed ({error.get('type')}: {error.get('message')}); "
            f"attempt {task.attempts + 1} is due, back in the queue: "
        )
    if who is None or not who.breakers:
        return {
            "reason": "no_agent",
            "queue_depth": depth,
            "detail": f"{prefix}no live agent has capability {cap!r} ({depth} task(s) wait for one)",
        }
    if who.all_tripped:
        states = ", ".join(f"{agent} ({state})" for agent, state in who.breakers.items())
        return {
            "reason": "circuit_open",
            "queue_depth": depth,
            "agents": who.agents,
            "breakers": dict(who.breakers),
            "detail": f"{prefix}every live agent of {cap!r} has its circuit breaker open: {states}; "
            f"a half-open one takes one probe task at a time ({depth} task(s) wait)",
        }
    answer: dict[str, Any] = {
        "reason": "queued",
        "queue_depth": depth,
        "agents": who.agents,
        "detail": f"{prefix}{depth} task(s) queued for {cap!r} (priority {task.priority} here), "
        f"{len(who.breakers)} live agent(s)",
    }
    if who.stalled:
        answer["unhealthy_agents"] = list(who.stalled)
        answer["detail"] += f"; not consuming although work waits (unhealthy): {', '.join(who.stalled)}"
    return answer


def select(tasks: Mapping[str, TaskRecord], workflow_id: str, task_id: str | None) -> list[TaskRecord]:
    """The tasks ``why`` answers for: the one asked about, or every unfinished one.

    Raises:
        KeyError: the workflow has no task ``task_id``.
    """
    if task_id is None:
        return [t for t in tasks.values() if not t.status.terminal]
    if task_id not in tasks:
        raise KeyError(f"workflow {workflow_id} has no task {task_id!r}")
    return [tasks[task_id]]


def queues_to_read(selected: Iterable[TaskRecord], now: float) -> list[str]:
    """The capabilities whose queue depth the answers need (of the tasks waiting in their queue)."""
    return sorted({task.capability for task in selected if in_queue(task, now)})


def explain(
    workflow_id: str,
    tasks: Mapping[str, TaskRecord],
    selected: Sequence[TaskRecord],
    *,
    now: float,
    who: Mapping[str, Serving],
    depths: Mapping[str, int],
) -> list[dict[str, Any]]:
    """For each selected task: why it is not running, or where it runs (docs/protocol.md §7, ``why``).

    Args:
        tasks: every task of the workflow (the dependencies of a waiting task are looked up here).
        who: the live agents of each capability (:func:`serving`).
        depths: messages in each capability queue of :func:`queues_to_read` (0 when it has none).
    """
    return [_explain_one(workflow_id, tasks, task, now=now, who=who, depths=depths) for task in selected]


def _explain_one(
    workflow_id: str,
    tasks: Mapping[str, TaskRecord],
    task: TaskRecord,
    *,
    now: float,
    who: Mapping[str, Serving],
    depths: Mapping[str, int],
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "task_id": task.task_id,
        "status": str(task.status),
        "capability": task.capability,
    }
    if task.status.terminal:
        answer.update(reason="finished", detail=f"ended {task.status}")
    elif task.status is TaskStatus.WAITING:
        pending = [d for d in task.depends_on if tasks[d].status is not TaskStatus.SUCCEEDED]
        answer.update(reason="waiting_on", waiting_on=pending, detail=f"waiting on {', '.join(pending)}")
    elif in_queue(task, now):
        # Queued, or a retry whose attempt is due (back in the capability queue): who takes it?
        answer.update(why_queued(task, depth=depths.get(task.capability, 0), who=who.get(task.capability)))
    elif task.status is TaskStatus.RUNNING:
        answer.update(
            reason="running_on",
            agent=task.agent,
            since=task.started_at,
            detail=f"running on {task.agent} (attempt {task.attempts})",
        )
    elif task.status is TaskStatus.RETRYING:
        error = task.error or {}
        answer.update(
            reason="backoff_until",
            until=task.retry_at,
            detail=f"attempt {task.attempts} failed ({error.get('type')}: {error.get('message')}); "
            f"next attempt in {max(0.0, (task.retry_at or 0) - now):.0f}s",
        )
    elif task.status is TaskStatus.ESCALATED:
        escalation = task.escalation or {}
        error = escalation.get("error") or task.error or {}
        ref = f"{workflow_id} --task {task.task_id}"
        answer.update(
            reason="escalated",
            escalation_reason=escalation.get("reason"),
            since=escalation.get("at"),
            agent=escalation.get("agent"),
            detail=f"escalated to an operator ({escalation.get('reason', 'requested')}) after "
            f"attempt {escalation.get('attempt', task.attempts)}: {error.get('type')}: "
            f"{error.get('message')}; `fabric resume {ref}` or `fabric abort {ref}`",
        )
    else:
        answer.update(reason=str(task.status), detail=f"{task.status}: waits for an operator")
    return answer
