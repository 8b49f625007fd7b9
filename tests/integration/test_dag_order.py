"""Random DAGs through the real router and an in-process worker.

Every task runs exactly once, only after all of its dependencies finished, and sees their results.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from typing import Any

import pytest

from fabric import Agent, FabricClient, Task
from fabric.router.service import Router
from tests.integration.conftest import StartWorker

pytestmark = pytest.mark.rabbitmq

CAPABILITY = "t.order"


def _random_dag(seed: int) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """5 to 25 tasks; edges only go forward in a random order of ids; tasks listed in another random order."""
    rng = random.Random(seed)
    n = rng.randint(5, 25)
    ids = [f"n{i}" for i in range(n)]
    rng.shuffle(ids)
    deps: dict[str, list[str]] = {}
    for position, task_id in enumerate(ids):
        earlier = ids[:position]
        deps[task_id] = rng.sample(earlier, rng.randint(0, min(len(earlier), 4)))
    listed = list(ids)
    rng.shuffle(listed)
    tasks = [
        {
            "id": task_id,
            "capability": CAPABILITY,
            "input": rng.randint(0, 1000),
            "depends_on": deps[task_id],
            "priority": rng.randint(0, 9),
        }
        for task_id in listed
    ]
    return deps, tasks


class _Recorder:
    """Records, under one counter, when each task started and finished and what it received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self.runs: Counter[str] = Counter()
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.upstream: dict[str, dict[str, Any]] = {}

    def agent(self) -> Agent:
        agent = Agent("order")

        # Sync, so tasks run side by side in the worker's threads and can interleave for real.
        @agent.handler(CAPABILITY)
        def record(task: Task) -> list[Any]:
            with self._lock:
                self.runs[task.task_id] += 1
                self.started[task.task_id] = next(self._clock)
                self.upstream[task.task_id] = dict(task.upstream)
            result = [task.task_id, task.input]
            with self._lock:
                self.finished[task.task_id] = next(self._clock)
            return result

        return agent


@pytest.mark.parametrize("seed", [1, 2, 3, 5, 8, 13])
async def test_random_dag_runs_each_task_once_after_its_dependencies(
    seed: int, client: FabricClient, router: Router, start_worker: StartWorker, extra_caps: list[str]
) -> None:
    extra_caps.append(CAPABILITY)
    deps, tasks = _random_dag(seed)
    inputs = {task["id"]: task["input"] for task in tasks}
    recorder = _Recorder()
    await start_worker(recorder.agent(), concurrency=3)

    done = await client.run({"tasks": tasks}, timeout_s=60)

    assert done.status == "succeeded"
    assert {task_id: outcome.status for task_id, outcome in done.tasks.items()} == dict.fromkeys(
        deps, "succeeded"
    )
    assert recorder.runs == Counter(dict.fromkeys(deps, 1))
    for task_id, task_deps in deps.items():
        for dep in task_deps:
            assert recorder.finished[dep] < recorder.started[task_id], (
                f"{task_id} started before {dep} finished"
            )
        assert recorder.upstream[task_id] == {dep: [dep, inputs[dep]] for dep in task_deps}, task_id
        assert done.tasks[task_id].result == [task_id, inputs[task_id]]
        assert done.tasks[task_id].attempts == 1
