"""build_graph: random DAGs are accepted in dependency order; any back edge is a named cycle."""

from __future__ import annotations

import string
from itertools import pairwise

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.protocol.messages import RejectReason, TaskSpec
from fabric.router.graph import GraphError, build_graph

#: Task ids drawn from the whole alphabet of TASK_ID_PATTERN, short enough to collide now and then.
_IDS = st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=6)


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """``{task id: depends_on}``: edges only go from a lower to a higher position of a random id order."""
    n = draw(st.integers(min_value=1, max_value=40))
    ids = draw(st.lists(_IDS, min_size=n, max_size=n, unique=True))
    deps: dict[str, list[str]] = {}
    for position, task_id in enumerate(ids):
        earlier = ids[:position]
        deps[task_id] = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
    return deps


def _specs(deps: dict[str, list[str]], order: list[str]) -> list[TaskSpec]:
    return [TaskSpec(id=task_id, capability="x", depends_on=deps[task_id]) for task_id in order]


def _cycle_path(detail: str) -> list[str]:
    prefix = "dependency cycle: "
    assert detail.startswith(prefix), detail
    return detail.removeprefix(prefix).split(" -> ")


@settings(deadline=None)
@given(deps=dags(), data=st.data())
def test_random_dag_is_accepted_and_sorts_after_every_dependency(
    deps: dict[str, list[str]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(list(deps)))

    graph = build_graph(_specs(deps, order))

    assert set(graph.nodes) == set(deps)
    assert {(u, v) for u, v in graph.edges} == {(dep, t) for t, ds in deps.items() for dep in ds}
    position = {task_id: i for i, task_id in enumerate(nx.topological_sort(graph))}
    for task_id, task_deps in deps.items():
        for dep in task_deps:
            assert position[dep] < position[task_id], (dep, task_id)


@settings(deadline=None)
@given(deps=dags(), data=st.data())
def test_any_back_edge_is_rejected_naming_a_real_cycle(
    deps: dict[str, list[str]], data: st.DataObject
) -> None:
    acyclic = build_graph(_specs(deps, list(deps)))
    node = data.draw(st.sampled_from(sorted(deps)))
    # The ancestor gets a dependency on its descendant (or the node on itself): edge node -> ancestor.
    ancestor = data.draw(st.sampled_from(sorted(nx.ancestors(acyclic, node) | {node})))
    cyclic = {task_id: list(task_deps) for task_id, task_deps in deps.items()}
    cyclic[ancestor].append(node)
    order = data.draw(st.permutations(list(cyclic)))

    with pytest.raises(GraphError) as info:
        build_graph(_specs(cyclic, order))

    assert info.value.reason is RejectReason.CYCLE
    path = _cycle_path(info.value.detail)
    assert len(path) >= 2
    assert path[0] == path[-1]
    assert len(set(path[:-1])) == len(path) - 1, f"a cycle visits each task once: {path}"
    for dep, dependent in pairwise(path):
        assert dep in cyclic[dependent], f"{dep} -> {dependent} is not an edge: {info.value.detail}"


def test_duplicate_ids_are_listed() -> None:
    tasks = [TaskSpec(id=i, capability="x") for i in ("b", "a", "c", "a", "b", "b")]

    with pytest.raises(GraphError) as info:
        build_graph(tasks)

    assert info.value.reason is RejectReason.DUPLICATE_TASK_ID
    assert info.value.detail == "task ids used more than once: a, b"


def test_unknown_dependency_names_task_and_missing_id() -> None:
    tasks = [
        TaskSpec(id="a", capability="x"),
        TaskSpec(id="task", capability="x", depends_on=["a", "missing"]),
    ]

    with pytest.raises(GraphError) as info:
        build_graph(tasks)

    assert info.value.reason is RejectReason.UNKNOWN_DEPENDENCY
    assert info.value.detail == "dependencies on tasks not in the workflow: task -> missing"


def test_self_loop_is_a_cycle() -> None:
    with pytest.raises(GraphError) as info:
        build_graph([TaskSpec(id="a", capability="x", depends_on=["a"])])

    assert info.value.reason is RejectReason.CYCLE
    assert info.value.detail == "dependency cycle: a -> a"


def test_long_unknown_dependency_detail_is_truncated() -> None:
    tasks = [TaskSpec(id="t", capability="x", depends_on=[f"m{i:02d}" for i in range(13)])]

    with pytest.raises(GraphError) as info:
        build_graph(tasks)

    detail = info.value.detail
    assert detail.endswith("t -> m09 (and 3 more)")
    assert detail.count(" -> ") == 10
    assert "m10" not in detail


def test_long_duplicate_detail_is_truncated() -> None:
    tasks = [TaskSpec(id=f"d{i:02d}", capability="x") for i in range(15)] * 2

    with pytest.raises(GraphError) as info:
        build_graph(tasks)

    assert info.value.detail == (
        "task ids used more than once: d00, d01, d02, d03, d04, d05, d06, d07, d08, d09 (and 5 more)"
    )


def test_exactly_ten_items_are_not_truncated() -> None:
    tasks = [TaskSpec(id="t", capability="x", depends_on=[f"m{i}" for i in range(10)])]

    with pytest.raises(GraphError) as info:
        build_graph(tasks)

    assert "more)" not in info.value.detail
    assert info.value.detail.count(" -> ") == 10
