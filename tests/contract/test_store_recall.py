"""The StateStore ``recalled`` contract: cancelled tasks whose copies workers must drop, checked against
every backend. Keyset pages ascending by key; a task leaves the list when its flag is cleared."""

from __future__ import annotations

import pytest

from fabric.protocol.messages import TaskStatus
from fabric.store import StateStore
from fabric.store.base import MAX_RECALLED

from .test_store import task, workflow
from .test_store_queries import all_pages


async def walk(store: StateStore, limit: int) -> list[tuple[str, str]]:
    async def fetch(*, limit: int, cursor: str | None) -> object:
        return await store.recalled(limit=limit, cursor=cursor)

    return await all_pages(fetch, limit)


async def test_recalled_lists_cancelled_tasks_with_the_flag_by_key_each_once(store: StateStore) -> None:
    for wid in ("wf-b", "wf-a"):
        await store.insert_workflow(workflow(wid), [task("q", wid)])
    await store.save(
        tasks=[
            task("z", "wf-b", status=TaskStatus.CANCELLED, recall=True),
            task("q", "wf-b", status=TaskStatus.CANCELLED, recall=True),
            task("x", "wf-a", status=TaskStatus.CANCELLED, recall=True),
            # Cancelled without copies out (it never left waiting): not listed.
            task("w", "wf-a", status=TaskStatus.CANCELLED),
            # Only a cancelled task is recalled, whatever its flag says.
            task("q", "wf-a", status=TaskStatus.QUEUED, recall=True),
        ]
    )
    expected = [("wf-a", "x"), ("wf-b", "q"), ("wf-b", "z")]
    first = await store.recalled()
    assert first.items == expected
    assert first.next_cursor is None
    for limit in (1, 2, 3):
        assert await walk(store, limit) == expected, limit


async def test_a_cleared_flag_leaves_the_list_and_a_set_one_joins_it(store: StateStore) -> None:
    await store.insert_workflow(workflow("wf-1"), [])
    await store.save(tasks=[task("a", status=TaskStatus.CANCELLED, recall=True)])
    assert (await store.recalled()).items == [("wf-1", "a")]
    # A worker dropped the copy: the router clears the flag (the last version of a batch wins).
    await store.save(
        tasks=[
            task("a", status=TaskStatus.CANCELLED, recall=True),
            task("a", status=TaskStatus.CANCELLED, recall=False),
        ]
    )
    assert (await store.recalled()).items == []
    assert (await store.get_tasks("wf-1"))["a"].recall is False
    # Another copy showed up (a worker started it): the flag is set again.
    await store.save(tasks=[task("a", status=TaskStatus.CANCELLED, recall=True)])
    assert (await store.recalled()).items == [("wf-1", "a")]
    assert (await store.get_tasks("wf-1"))["a"].recall is True


async def test_recalled_refuses_a_bad_cursor_or_limit(store: StateStore) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await store.recalled(cursor="not-a-cursor")
    for limit in (0, MAX_RECALLED + 1):
        with pytest.raises(ValueError, match="limit"):
            await store.recalled(limit=limit)
