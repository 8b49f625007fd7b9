"""Workflow dependency graphs: build and validate with networkx. Pure: no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from fabric.protocol.messages import RejectReason, TaskSpec


@dataclass(eq=False)
class GraphError(Exception):
    """The graph cannot run: ``reason`` is a reject code, ``detail`` says which tasks."""

    reason: RejectReason
    detail: str


def build_graph(tasks: Sequence[TaskSpec]) -> nx.DiGraph:
    """Build the DAG of ``tasks`` (edge dependency -> dependent) and check it can run.

    Raises:
        GraphError: ``duplicate_task_id``, ``unknown_dependency`` or ``cycle`` (a self-loop is a cycle);
            the detail names the offending ids (for a cycle, the cycle itself in order).

    Example:
        >>> a = TaskSpec(id="a", capability="x")
        >>> g = build_graph([a, TaskSpec(id="b", capability="x", depends_on=["a"])])
        >>> list(nx.topological_sort(g))
        ['a', 'b']
    """
    counts = Counter(task.id for task in tasks)
    duplicates = sorted(task_id for task_id, n in counts.items() if n > 1)
    if duplicates:
        raise GraphError(
            RejectReason.DUPLICATE_TASK_ID, f"task ids used more than once: {_names(duplicates)}"
        )

    graph = nx.DiGraph()
    graph.add_nodes_from(task.id for task in tasks)
    unknown: list[str] = []
    for task in tasks:
        for dep in task.depends_on:
            if dep not in counts:
                unknown.append(f"{task.id} -> {dep}")
            graph.add_edge(dep, task.id)
    if unknown:
        raise GraphError(
            RejectReason.UNKNOWN_DEPENDENCY, f"dependencies on tasks not in the workflow: {_names(unknown)}"
        )

    if not nx.is_directed_acyclic_graph(graph):
        cycle = [edge[0] for edge in nx.find_cycle(graph)]
        path = " -> ".join([*cycle, cycle[0]])
        raise GraphError(RejectReason.CYCLE, f"dependency cycle: {path}")
    return graph


def _names(items: Sequence[str], most: int = 10) -> str:
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown} (and {len(items) - most} more)"
