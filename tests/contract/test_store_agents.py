"""The StateStore agents contract (put_agent, list_agents, prune_agents), checked against every backend.
Times are explicit values, never the clock."""

from __future__ import annotations

import asyncio

from fabric.store import AgentRecord, StateStore

from .conftest import Backend


def _agent(agent_id: str, last_seen: float, health: str = "ok") -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        agent="demo",
        host="h",
        pid=1,
        capabilities=["demo.echo"],
        concurrency=2,
        health=health,
        first_seen=last_seen - 10,
        last_seen=last_seen,
    )


async def test_prune_removes_only_the_named_agents_seen_before_the_bound(store: StateStore) -> None:
    for agent in (
        _agent("old-stopped", 100.0, "stopped"),
        _agent("old-lost", 150.0),
        _agent("edge", 200.0),
        _agent("fresh", 300.0),
        _agent("old-unnamed", 50.0),
    ):
        await store.put_agent(agent)
    removed = await store.prune_agents(
        ["old-stopped", "old-lost", "edge", "fresh", "nobody", "old-lost"], seen_before=200.0
    )
    assert sorted(removed) == ["old-lost", "old-stopped"]
    assert [a.agent_id for a in await store.list_agents()] == ["edge", "fresh", "old-unnamed"]
    assert await store.prune_agents(["old-lost"], seen_before=200.0) == [], "already gone"
    assert await store.prune_agents([], seen_before=1e12) == []


async def test_an_agent_seen_again_before_the_prune_is_kept(store: StateStore) -> None:
    await store.put_agent(_agent("back", 100.0, "stopped"))
    await store.put_agent(_agent("back", 500.0))  # restarted with the same id: a new heartbeat
    assert await store.prune_agents(["back"], seen_before=200.0) == []
    (kept,) = await store.list_agents()
    assert (kept.last_seen, kept.health) == (500.0, "ok")


async def test_prune_and_heartbeats_racing_never_drop_a_fresh_record(store: StateStore) -> None:
    await store.put_agent(_agent("racer", 100.0))
    beats = [store.put_agent(_agent("racer", 1000.0 + i)) for i in range(20)]
    prunes = [store.prune_agents(["racer"], seen_before=200.0) for _ in range(20)]
    await asyncio.gather(*beats, *prunes)
    agents = await store.list_agents()
    assert [a.agent_id for a in agents] in (["racer"], []), agents
    # Whatever interleaving happened, a record written after the last prune survives it.
    await store.put_agent(_agent("racer", 2000.0))
    assert await store.prune_agents(["racer"], seen_before=200.0) == []
    assert [a.last_seen for a in await store.list_agents()] == [2000.0]


async def test_pruned_agents_stay_gone_for_a_new_store(durable_backend: Backend) -> None:
    async with durable_backend.make() as store:
        await store.put_agent(_agent("gone", 100.0, "stopped"))
        await store.put_agent(_agent("kept", 300.0))
        assert await store.prune_agents(["gone", "kept"], seen_before=200.0) == ["gone"]
    async with durable_backend.make() as reopened:
        assert [a.agent_id for a in await reopened.list_agents()] == ["kept"]
