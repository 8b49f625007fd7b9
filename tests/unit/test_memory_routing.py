"""The routing rules of the in-memory broker: AMQP topic patterns and headers-exchange matching."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.transport.memory import Binding, Message, headers_match, topic_matches


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("task.#", "task.completed", True),
        ("task.#", "task", True),
        ("task.#", "task.a.b.c", True),
        ("task.#", "workflow.done", False),
        ("task.*", "task.completed", True),
        ("task.*", "task.a.b", False),
        ("task.*", "task", False),
        ("#", "", True),
        ("#", "anything.at.all", True),
        ("alert.*.task.#", "alert.critical.task.escalated", True),
        ("alert.*.task.#", "alert.critical.agent.lost", False),
        ("workflow.w1.*", "workflow.w1.done", True),
        ("workflow.w1.*", "workflow.w2.done", False),
        ("*.b.#.d", "a.b.c.c.d", True),
        ("*.b.#.d", "a.b.d", True),
        ("*.b.#.d", "b.d", False),
        ("exact.key", "exact.key", True),
        ("exact.key", "exact.keys", False),
    ],
)
def test_topic_patterns(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern.split("."), key.split(".")) is matches


@pytest.mark.parametrize(
    ("arguments", "headers", "matches"),
    [
        ({"x-match": "all", "fabric-delay": "1s"}, {"fabric-delay": "1s", "other": 1}, True),
        ({"x-match": "all", "fabric-delay": "1s"}, {"fabric-delay": "5s"}, False),
        ({"x-match": "all", "fabric-delay": "1s"}, {}, False),
        ({"x-match": "all", "a": 1, "b": 2}, {"a": 1}, False),
        ({"x-match": "any", "a": 1, "b": 2}, {"a": 1}, True),
        ({"x-match": "any", "a": 1, "b": 2}, {"c": 1}, False),
        ({"a": 1}, {"a": 1}, True),
    ],
)
def test_headers_matching(arguments: dict[str, Any], headers: dict[str, Any], matches: bool) -> None:
    binding = Binding("q", "x", "", tuple(sorted(arguments.items())))
    assert headers_match(binding, Message(b"", "", headers)) is matches
