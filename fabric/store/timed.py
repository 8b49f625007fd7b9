"""A state store wrapper that reports how long every call takes (for the store latency metric)."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, Self, cast

from fabric.store.base import StateStore

#: Receives the operation (the method's name) and its duration in seconds.
Observer = Callable[[str, float], None]


class _TimedStore:
    """Delegates to ``inner``; each coroutine method is timed. A method is wrapped on first use and then
    kept as an attribute, so later calls cost one attribute lookup and two clock reads."""

    def __init__(self, inner: StateStore, observe: Observer) -> None:
        self._inner = inner
        self._observe = observe

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(target):
            return target
        observe = self._observe

        @functools.wraps(target)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await target(*args, **kwargs)
            finally:
                observe(name, time.perf_counter() - started)

        setattr(self, name, timed)
        return timed


def timed(store: StateStore, observe: Observer) -> StateStore:
    """``store``, with the duration of every call passed to ``observe(operation, seconds)``.

    Example:
        >>> store = timed(open_store("memory://"), lambda op, s: print(op, s))
    """
    return cast(StateStore, _TimedStore(store, observe))
