"""Agent handler registration, and Worker refusing an agent with nothing to run."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest

from fabric import Agent, Task, load_settings
from fabric.worker.runtime import Worker


def test_sync_and_async_handlers_register() -> None:
    agent = Agent("mixed")

    @agent.handler("x.sync")
    def sync_handler(task: Task) -> Any:
        return task.input

    @agent.handler("x.async", timeout_s=12.5)
    async def async_handler(task: Task) -> Any:
        return task.input

    assert agent.capabilities == ["x.async", "x.sync"]
    sync, asynchronous = agent.handlers["x.sync"], agent.handlers["x.async"]
    assert (sync.func, sync.is_async, sync.timeout_s) == (sync_handler, False, None)
    assert (asynchronous.func, asynchronous.is_async, asynchronous.timeout_s) == (async_handler, True, 12.5)
    assert sync.capability == "x.sync"
    assert "x.async" in repr(agent)


def test_decorator_returns_the_function_unchanged() -> None:
    agent = Agent("plain")

    def handler(task: Task) -> int:
        return 1

    assert agent.handler("x.one")(handler) is handler


def test_partial_of_a_coroutine_function_is_async() -> None:
    agent = Agent("partials")

    async def handler(task: Task, extra: int) -> int:
        return extra

    agent.handler("x.partial")(functools.partial(handler, extra=1))

    assert agent.handlers["x.partial"].is_async is True


@pytest.mark.parametrize("capability", ["Upper", "has space", "", ".dot", "a" * 65])
def test_bad_capability_is_rejected(capability: str) -> None:
    agent = Agent("strict")

    with pytest.raises(ValueError, match="invalid capability"):
        agent.handler(capability)

    assert agent.handlers == {}


def test_second_handler_for_a_capability_is_rejected() -> None:
    agent = Agent("once")

    @agent.handler("x.once")
    def first(task: Task) -> None:
        return None

    with pytest.raises(ValueError, match=r"already has a handler for 'x\.once'"):
        agent.handler("x.once")
    assert agent.handlers["x.once"].func is first


@pytest.mark.parametrize("name", ["", "n" * 65])
def test_agent_name_length(name: str) -> None:
    with pytest.raises(ValueError, match="1 to 64"):
        Agent(name)


def test_worker_refuses_an_agent_without_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.upper().startswith("FABRIC_"):
            monkeypatch.delenv(variable)
    settings = load_settings(namespace="x")

    with pytest.raises(ValueError, match=r"agent 'idle' has no handlers"):
        Worker(Agent("idle"), settings)
