"""Agents: a named set of capability handlers."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fabric.protocol.messages import OnExhausted
from fabric.topology.names import check_capability


@dataclass
class Task:
    """What a handler receives: its input, the results of its dependencies, and where it stands.

    Attributes:
        input: the task's ``input`` from the submission.
        upstream: results of the tasks it depends on, by task id.
        workflow_id, task_id, capability: identity of the task.
        attempt: 1-based attempt number; max_attempts the most it gets.
        agent_id: the agent running it.
        timeout_s: time limit of this attempt.
        on_exhausted: what happens once it is out of attempts (``park`` or ``escalate``); None when the
            task message did not say (the worker's settings decide).
    """

    input: Any
    upstream: dict[str, Any]
    workflow_id: str
    task_id: str
    capability: str
    attempt: int
    max_attempts: int
    agent_id: str
    timeout_s: float
    #: Set when the task should stop early (timeout or cancellation); sync handlers can poll it.
    cancelled: Any = field(default=None, repr=False)
    on_exhausted: OnExhausted | None = None

    @property
    def is_cancelled(self) -> bool:
        return bool(self.cancelled is not None and self.cancelled.is_set())


HandlerFunc = Callable[[Task], Any | Awaitable[Any]]
_F = TypeVar("_F", bound=HandlerFunc)


@dataclass(frozen=True)
class Handler:
    """A registered handler: its capability, function, and whether it runs on the event loop."""

    capability: str
    func: HandlerFunc
    is_async: bool
    timeout_s: float | None = None


class Agent:
    """A named set of capability handlers. Sync handlers run on threads of their own, off the event loop.

    Example:
        >>> agent = Agent("summarizer")
        >>> @agent.handler("llm.summarize", timeout_s=60)
        ... async def summarize(task: Task) -> str:
        ...     return task.input["text"][:100]
    """

    def __init__(self, name: str) -> None:
        if not name or len(name) > 64:
            raise ValueError("agent name must be 1 to 64 characters")
        self.name = name
        self.handlers: dict[str, Handler] = {}

    def handler(self, capability: str, *, timeout_s: float | None = None) -> Callable[[_F], _F]:
        """Register the decorated function as the handler of ``capability``.

        Args:
            capability: the capability name, ``[a-z0-9][a-z0-9_.-]{0,63}``.
            timeout_s: default time limit per attempt when the task gives none.

        Raises:
            ValueError: invalid capability name, or a second handler for the same capability.
        """
        check_capability(capability)
        if capability in self.handlers:
            raise ValueError(f"agent {self.name!r} already has a handler for {capability!r}")

        def register(func: _F) -> _F:
            is_async = inspect.iscoroutinefunction(func) or asyncio.iscoroutinefunction(func)
            self.handlers[capability] = Handler(capability, func, is_async, timeout_s)
            return func

        return register

    @property
    def capabilities(self) -> list[str]:
        return sorted(self.handlers)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, capabilities={self.capabilities})"
