"""fabric.topology.teardown: what `fabric topology delete` deletes and what it says, from the broker's
answers."""

from __future__ import annotations

import pytest

from fabric.topology import spec
from fabric.topology.teardown import EXIT_REFUSED, Deletion, Left, Plan, QueueState, plan, report

NS = "ns"
TOPOLOGY = spec.build(NS, ["demo.echo"])
QUEUES = [q.name for q in TOPOLOGY.queues]
EXCHANGES = [e.name for e in TOPOLOGY.exchanges]
CAP = "ns.cap.demo.echo"
IDLE = QueueState(0, 0)


def states(**overrides: QueueState | None) -> dict[str, QueueState | None]:
    """Every queue exists and is idle, but for ``overrides`` (keys: queue names with '.' as '__')."""
    found: dict[str, QueueState | None] = dict.fromkeys(QUEUES, IDLE)
    found.update({name.replace("__", "."): state for name, state in overrides.items()})
    return found


ALL_EXCHANGES = dict.fromkeys(EXCHANGES, True)

PLANS = [
    pytest.param(
        states(), ALL_EXCHANGES, False, Plan(queues=tuple(QUEUES), exchanges=tuple(EXCHANGES)), id="all-idle"
    ),
    pytest.param(
        states(ns__cap__demo__echo=QueueState(1, 0)),
        ALL_EXCHANGES,
        False,
        Plan(refused=(Left("queue", CAP, "holds 1 message(s)"),)),
        id="a-message-refuses-everything",
    ),
    pytest.param(
        states(ns__router__submit=QueueState(0, 1), ns__dead=QueueState(3, 0)),
        ALL_EXCHANGES,
        False,
        Plan(
            refused=(
                Left("queue", "ns.router.submit", "has 1 consumer(s) (a running router or worker)"),
                Left("queue", "ns.dead", "holds 3 message(s)"),
            )
        ),
        id="each-busy-queue-named",
    ),
    pytest.param(
        states(ns__cap__demo__echo=QueueState(2, 1)),
        ALL_EXCHANGES,
        False,
        Plan(
            refused=(
                Left("queue", CAP, "holds 2 message(s) and has 1 consumer(s) (a running router or worker)"),
            )
        ),
        id="messages-and-consumers",
    ),
    pytest.param(
        states(ns__cap__demo__echo=QueueState(2, 1)),
        ALL_EXCHANGES,
        True,
        Plan(queues=tuple(QUEUES), exchanges=tuple(EXCHANGES)),
        id="force-deletes-busy-queues",
    ),
    pytest.param(
        states(ns__cap__demo__echo=None),
        {**ALL_EXCHANGES, "ns.alerts": False},
        False,
        Plan(
            queues=tuple(q for q in QUEUES if q != CAP),
            exchanges=tuple(e for e in EXCHANGES if e != "ns.alerts"),
            absent=(CAP, "ns.alerts"),
        ),
        id="absent-ones-are-not-deleted-but-named",
    ),
    pytest.param({}, {}, False, Plan(absent=(*QUEUES, *EXCHANGES)), id="nothing-there"),
]


@pytest.mark.parametrize(("queues", "exchanges", "force", "expected"), PLANS)
def test_plan(
    queues: dict[str, QueueState | None], exchanges: dict[str, bool], force: bool, expected: Plan
) -> None:
    assert plan(TOPOLOGY, queues, exchanges, force=force) == expected


def test_the_capability_queues_are_planned_before_the_exchanges_they_are_bound_to() -> None:
    decided = plan(TOPOLOGY, states(), ALL_EXCHANGES, force=False)
    assert CAP in decided.queues
    assert "ns.tasks" in decided.exchanges


def test_report_of_a_refusal_names_each_queue_and_deletes_nothing() -> None:
    refused = plan(TOPOLOGY, states(ns__cap__demo__echo=QueueState(1, 0)), ALL_EXCHANGES, force=False)
    lines, code = report(NS, refused, [], ["demo.echo"])
    assert code == EXIT_REFUSED
    assert lines[0] == "refused: nothing of namespace 'ns' was deleted; these queues are busy:"
    assert f"  queue {CAP}: holds 1 message(s)" in lines
    assert any("--force" in line for line in lines)
    assert lines[-1] == "capability queues looked at: demo.echo (name others with -c/--capability)"


def test_report_of_deletions_says_what_went_what_was_lost_and_what_was_left() -> None:
    decided = Plan(queues=(CAP, "ns.dead"), exchanges=("ns.tasks",), absent=("ns.alerts",))
    deletions = [
        Deletion("queue", CAP, True, messages=2),
        Deletion("queue", "ns.dead", True),
        Deletion("exchange", "ns.tasks", False, why="still bound to a queue"),
    ]
    lines, code = report(NS, decided, deletions, [])
    assert code == EXIT_REFUSED
    assert lines == [
        "deleted 2 queue(s) and exchange(s) of namespace 'ns':",
        f"  queue {CAP} (2 message(s) lost)",
        "  queue ns.dead",
        "left 1:",
        "  exchange ns.tasks: still bound to a queue",
        "not found (nothing to delete): ns.alerts",
        "capability queues looked at: none (name others with -c/--capability)",
    ]


def test_report_when_everything_went() -> None:
    lines, code = report(NS, Plan(queues=(CAP,)), [Deletion("queue", CAP, True)], ["demo.echo"])
    assert code == 0
    assert lines[:2] == ["deleted 1 queue(s) and exchange(s) of namespace 'ns':", f"  queue {CAP}"]


def test_report_when_nothing_was_there() -> None:
    lines, code = report(NS, Plan(absent=("ns.dead",)), [], [])
    assert code == 0
    assert "nothing of namespace 'ns' to delete" in lines
