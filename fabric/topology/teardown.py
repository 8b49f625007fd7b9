"""What ``fabric topology delete`` deletes, and what it tells the operator: pure, from what the broker says.

A queue that holds messages or has consumers is not deleted unless forced: its messages would be lost,
or a running router or worker would lose its queue under it. If any queue is refused, nothing at all is
deleted (a half-deleted namespace is worse than an intact one). The shell checks each queue and exchange
passively, calls :func:`plan`, performs the deletions (asking the broker to refuse a queue that became
busy meanwhile, and an exchange still bound to a queue fabric does not know), and prints :func:`report`
of the :class:`Deletion` results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fabric.topology.spec import Topology

#: Exit code when something was refused or left (as for other refused commands of the CLI).
EXIT_REFUSED = 4


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a passive declare tells about a queue that exists."""

    messages: int
    consumers: int


@dataclass(frozen=True, slots=True)
class Left:
    """A queue or exchange that is not deleted, and why."""

    kind: str
    name: str
    why: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The deletions to perform, in order, or the refusals that stop them all."""

    queues: tuple[str, ...] = ()
    exchanges: tuple[str, ...] = ()
    #: Busy queues (messages, consumers) when not forced: nothing is deleted then.
    refused: tuple[Left, ...] = ()
    #: Queues and exchanges of the topology that the broker does not have.
    absent: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Deletion:
    """The outcome of deleting one queue or exchange."""

    kind: str
    name: str
    deleted: bool
    #: Messages deleted with a queue (lost).
    messages: int = 0
    #: Why it was left, when not deleted (the broker's refusal, or that it had gone already).
    why: str = ""


def busy(state: QueueState) -> str:
    """Why a queue cannot be deleted safely ("" when it can): the messages it holds, its consumers."""
    reasons = []
    if state.messages:
        reasons.append(f"holds {state.messages} message(s)")
    if state.consumers:
        reasons.append(f"has {state.consumers} consumer(s) (a running router or worker)")
    return " and ".join(reasons)


def plan(
    topology: Topology,
    queues: Mapping[str, QueueState | None],
    exchanges: Mapping[str, bool],
    *,
    force: bool,
) -> Plan:
    """Decide what to delete from the broker's answers (``None`` / ``False``: it does not exist).

    Args:
        topology: every queue and exchange of the namespace that should go.
        queues: each queue's state, from passive declares (a queue left out counts as absent).
        exchanges: whether each exchange exists.
        force: delete busy queues too (their messages are lost).

    Example:
        >>> plan(spec.build("ns", ["demo.echo"]), states, found, force=False).refused
        (Left(kind='queue', name='ns.cap.demo.echo', why='holds 1 message(s)'),)
    """
    absent = [q.name for q in topology.queues if queues.get(q.name) is None]
    absent += [e.name for e in topology.exchanges if not exchanges.get(e.name, False)]
    present = {q.name: state for q in topology.queues if (state := queues.get(q.name)) is not None}
    refused = () if force else tuple(Left("queue", n, why) for n, s in present.items() if (why := busy(s)))
    if refused:
        return Plan(refused=refused, absent=tuple(absent))
    return Plan(
        queues=tuple(present),
        exchanges=tuple(e.name for e in topology.exchanges if exchanges.get(e.name, False)),
        absent=tuple(absent),
    )


def report(
    ns: str, plan: Plan, deletions: Sequence[Deletion], capabilities: Iterable[str]
) -> tuple[list[str], int]:
    """The lines to print after :func:`plan` and its deletions, and the exit code (0, or 4 when
    anything was refused or left)."""
    caps = sorted(capabilities)
    looked = f"capability queues looked at: {', '.join(caps) if caps else 'none'}"
    hint = "name others with -c/--capability"
    if plan.refused:
        lines = [f"refused: nothing of namespace {ns!r} was deleted; these queues are busy:"]
        lines += [f"  {left.kind} {left.name}: {left.why}" for left in plan.refused]
        lines.append(
            "stop the router and workers, let the queues drain (or `fabric dead purge` the parked ones), "
            "or add --force to delete them with their messages"
        )
        return [*lines, f"{looked} ({hint})"], EXIT_REFUSED
    deleted = [d for d in deletions if d.deleted]
    left = [d for d in deletions if not d.deleted]
    lines = [f"deleted {len(deleted)} queue(s) and exchange(s) of namespace {ns!r}:"] if deleted else []
    for d in deleted:
        lost = f" ({d.messages} message(s) lost)" if d.messages else ""
        lines.append(f"  {d.kind} {d.name}{lost}")
    if left:
        lines.append(f"left {len(left)}:")
        lines += [f"  {d.kind} {d.name}: {d.why}" for d in left]
    if plan.absent:
        lines.append(f"not found (nothing to delete): {', '.join(plan.absent)}")
    if not deleted and not left:
        lines.append(f"nothing of namespace {ns!r} to delete")
    return [*lines, f"{looked} ({hint})"], EXIT_REFUSED if left else 0
