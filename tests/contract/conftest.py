"""Fixtures of the StateStore contract suite: one suite, run against every backend.

``backend`` is parametrized over memory, SQLite (a file in ``tmp_path``) and Redis (a unique key prefix
``test-<uuid4 hex>:``, purged in teardown). Redis tests carry the ``redis`` marker; when Redis at
``TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) does not answer they are skipped locally
and fail on CI (``CI=true``), so a missing service can never turn a CI run green.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.errors import StoreError
from fabric.store import StateStore, open_store
from fabric.store.redis import RedisStore

#: Where the Redis backend of the suite connects.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Backend:
    """One backend under test.

    ``make()`` builds a new, unopened store over this test's data: for SQLite the same file, for Redis
    the same prefix, for memory a fresh (empty) store, since nothing outlives a MemoryStore.
    """

    name: str
    make: Callable[[], StateStore]
    #: True when a second store from ``make()`` sees what the first one committed.
    durable: bool


def unreachable(reason: str) -> None:
    """Skip locally, fail on CI: a service the suite needs is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: real-service tests must run on CI)")
    pytest.skip(reason)


@pytest.fixture
def redis_url() -> str:
    """The Redis the suite uses; see :data:`REDIS_URL`."""
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses (it is the store namespace plus ``:``)."""
    return f"test-{uuid.uuid4().hex}:"


@contextlib.asynccontextmanager
async def _redis_backend(url: str, prefix: str) -> AsyncIterator[Backend]:
    namespace = prefix.removesuffix(":")
    probe = RedisStore(url, prefix=prefix)
    try:
        await probe.__aenter__()
    except StoreError as exc:
        unreachable(f"Redis is unreachable: {exc}")
    try:
        yield Backend("redis", lambda: open_store(url, namespace=namespace), durable=True)
    finally:
        try:
            await probe.purge()
        finally:
            await probe.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def _backend(name: str, tmp_path: Path, redis_prefix: str) -> AsyncIterator[Backend]:
    if name == "memory":
        yield Backend("memory", lambda: open_store("memory://"), durable=False)
    elif name == "sqlite":
        url = f"sqlite:///{tmp_path / 'fabric.db'}"
        yield Backend("sqlite", lambda: open_store(url), durable=True)
    else:
        async with _redis_backend(REDIS_URL, redis_prefix) as redis_backend:
            yield redis_backend


_REDIS = pytest.param("redis", marks=pytest.mark.redis)


@pytest.fixture(params=["memory", "sqlite", _REDIS])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[Backend]:
    """Each backend in turn, with its own empty data."""
    async with _backend(request.param, tmp_path, redis_prefix) as selected:
        yield selected


@pytest.fixture(params=["sqlite", _REDIS])
async def durable_backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[Backend]:
    """Each backend whose data outlives a store instance (a new store over the same file or prefix)."""
    async with _backend(request.param, tmp_path, redis_prefix) as selected:
        yield selected


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[StateStore]:
    """An open store of ``backend``; closed after the test."""
    async with backend.make() as opened:
        yield opened
