"""The StateStore samples contract (add_sample, samples): the dashboard's bounded time series, checked
against every backend. Times are explicit values, never the clock."""

from __future__ import annotations

import pytest

from fabric.store import Sample, StateStore
from fabric.store.base import MAX_SAMPLES

from .conftest import Backend


async def test_samples_come_back_oldest_first_from_since(store: StateStore) -> None:
    for at in (103.0, 101.0, 102.0):  # not in time order
        await store.add_sample(Sample(at, {"succeeded": int(at), "queues": {"demo.echo": 2}}), keep_since=0)
    assert [s.at for s in await store.samples(0)] == [101.0, 102.0, 103.0]
    later = await store.samples(102.0)
    assert [(s.at, s.data) for s in later] == [
        (102.0, {"succeeded": 102, "queues": {"demo.echo": 2}}),
        (103.0, {"succeeded": 103, "queues": {"demo.echo": 2}}),
    ]
    assert await store.samples(104.0) == []


async def test_an_append_drops_samples_older_than_keep_since(store: StateStore) -> None:
    for at in range(100, 110):
        await store.add_sample(Sample(float(at), {"n": at}), keep_since=float(at) - 3)
    assert [s.at for s in await store.samples(0)] == [106.0, 107.0, 108.0, 109.0]


async def test_at_most_max_samples_are_kept(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound itself, made small so the test stays quick: each backend reads it at call time.
    import fabric.store.memory
    import fabric.store.redis
    import fabric.store.sqlite

    for module in (fabric.store.memory, fabric.store.redis, fabric.store.sqlite):
        monkeypatch.setattr(module, "MAX_SAMPLES", 5)
    for at in range(20):
        await store.add_sample(Sample(float(at), {"n": at}), keep_since=0)
    assert [s.at for s in await store.samples(0)] == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert MAX_SAMPLES >= 3600  # an hour of one sample a second fits


async def test_samples_outlive_the_store_instance(durable_backend: Backend) -> None:
    async with durable_backend.make() as first:
        await first.add_sample(Sample(100.0, {"n": 1}), keep_since=0)
    async with durable_backend.make() as second:
        assert [(s.at, s.data) for s in await second.samples(0)] == [(100.0, {"n": 1})]
