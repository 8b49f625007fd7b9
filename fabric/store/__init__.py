"""State store: the :class:`StateStore` interface and its backends (memory, SQLite, Redis)."""

from __future__ import annotations

from fabric.errors import ConfigError
from fabric.store.base import (
    AgentRecord,
    DeadQuery,
    Page,
    Sample,
    StateStore,
    TaskRecord,
    WorkflowQuery,
    WorkflowRecord,
)

__all__ = [
    "AgentRecord",
    "DeadQuery",
    "Page",
    "Sample",
    "StateStore",
    "TaskRecord",
    "WorkflowQuery",
    "WorkflowRecord",
    "open_store",
]


def open_store(url: str, *, namespace: str = "fabric", sqlite_synchronous: str = "FULL") -> StateStore:
    """Build the backend named by ``url``: ``sqlite:///path``, ``redis://...``, or ``memory://``.

    Example:
        >>> async with open_store("memory://") as store:
        ...     await store.get_workflow("nope")
    """
    if url.startswith("memory://"):
        from fabric.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from fabric.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs/x.db -> "/abs/x.db"
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ConfigError("FABRIC_STORE__URL: sqlite URL needs a path, e.g. sqlite:///fabric.db")
        return SqliteStore(path, synchronous=sqlite_synchronous)
    if url.startswith(("redis://", "rediss://")):
        from fabric.store.redis import RedisStore

        return RedisStore(url, prefix=f"{namespace}:")
    raise ConfigError(f"FABRIC_STORE__URL: unknown store URL {url!r} (use sqlite:///, redis:// or memory://)")
