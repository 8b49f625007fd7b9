"""The CLI's pure helpers: picking a parked message by part of its id, the tables of `fabric agents` and
`fabric dead list` at 80 and 160 columns, reading workflow files, and naming what an agent module lacks."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from rich.console import Console

from fabric.cli import format as cliformat

WF = "wf-0123456789abcdef0123456789abcdef"
VIEWS = [
    {"id": f"{WF}/score/1", "task_id": "score"},
    {"id": f"{WF}/score/2", "task_id": "score"},
    {"id": f"{WF}/fetch/3", "task_id": "fetch"},
    {"id": f"{WF}/fetch/3", "task_id": "fetch"},  # the same attempt parked twice: one id
    {"id": "wf-ffff/score/1", "task_id": "score"},
    {"id": "9f2c0d11aa", "task_id": None},
]


@pytest.mark.parametrize(
    ("wanted", "ids"),
    [
        (f"{WF}/score/2", [f"{WF}/score/2"]),  # the exact id
        ("wf-0123", [f"{WF}/score/1", f"{WF}/score/2", f"{WF}/fetch/3"]),  # an ambiguous prefix
        ("wf-ff", ["wf-ffff/score/1"]),  # a unique prefix
        ("score/2", [f"{WF}/score/2"]),  # task/attempt
        ("fetch/3", [f"{WF}/fetch/3"]),  # duplicates count once
        ("fetch", [f"{WF}/fetch/3"]),  # the task id
        ("score/1", [f"{WF}/score/1", "wf-ffff/score/1"]),  # task/attempt in two workflows
        ("9f2c", ["9f2c0d11aa"]),  # a message that is no task
        ("nothing", []),
        ("core/2", []),  # no partial segment
    ],
)
def test_pick_ids(wanted: str, ids: list[str]) -> None:
    assert cliformat.pick_ids(wanted, VIEWS) == ids


def _render(renderable: Any, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def _parked_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": f"{WF}/score-3/3",
            "reason": "exhausted",
            "task_id": "score-3",
            "attempt": 3,
            "age_s": 12.0,
            "capability": "demo.sum",
            "last_error": "ValueError: upstream API returned 503, see https://status.example.com/incidents/1234567",
        },
        {
            "id": "0123456789abcdef0123456789abcdef",
            "reason": "undecodable",
            "task_id": None,
            "attempt": None,
            "age_s": 4000.0,
            "capability": "demo.sum",
            "last_error": "not msgpack",
        },
    ]


@pytest.mark.parametrize("width", [80, 100, 160, 240])
def test_dead_table_shows_full_ids_at_any_width(width: int) -> None:
    lines = _render(cliformat.dead_table(_parked_rows(), width), width)

    assert all(len(line) <= width for line in lines)
    for row in _parked_rows():
        assert any(row["id"] in line for line in lines), f"{row['id']} cut at {width} columns"
    text = " ".join(" ".join(lines).split())
    assert "upstream API returned 503" in text
    assert "[demo.sum] not msgpack" in text  # a message that is no task says its capability


def _agents() -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "agent_id": "demo@0123456789ab:1234567",
            "state": "alive",
            "health": "ok",
            "capabilities": ["demo.echo", "demo.sum", "demo.sleep", "demo.fail"],
            "consumers": {"demo.echo": {"score": 100}, "demo.sum": {"score": 87}},
            "breakers": {"demo.fail": "half_open"},
            "in_flight": 3,
            "concurrency": 8,
            "processed": 12345,
            "failed": 17,
            "last_seen": now - 2,
        },
        {
            "agent_id": "writer@0123456789ab:42",
            "state": "unhealthy",
            "reason": "stalled: llm.summarize had tasks ready for 60s and got none",
            "capabilities": ["llm.summarize"],
            "consumers": {},
            "in_flight": 0,
            "concurrency": 8,
            "processed": 0,
            "failed": 0,
            "last_seen": now - 3700,
        },
        {
            "agent_id": "demo@host:7",
            "state": "alive",
            "health": "draining",
            "capabilities": ["demo.echo"],
            "in_flight": 1,
            "concurrency": 2,
            "processed": 1,
            "failed": 0,
            "last_seen": now,
        },
    ]


@pytest.mark.parametrize("width", [80, 160])
def test_agents_table_is_readable_at_80_columns(width: int) -> None:
    table, notes = cliformat.agents_table(_agents(), time.time())
    lines = _render(table, width)

    assert all(len(line) <= width for line in lines)
    assert not any("…" in line for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for expected in [
        "demo@0123456789ab:1234567",
        "demo.echo (100)",
        "demo.sum (87)",
        "demo.fail breaker half_open",
        "12345",
        "3/8",
        "unhealthy*",
        "draining",
        "1h",
    ]:
        assert expected in text, f"{expected!r} missing or broken at {width} columns:\n{text}"
    assert notes == [
        "writer@0123456789ab:42: unhealthy: stalled: llm.summarize had tasks ready for 60s and got none"
    ]


def test_agents_table_shows_any_state() -> None:
    table, notes = cliformat.agents_table([{**_agents()[2], "state": "stopped", "health": "stopped"}], 0.0)

    assert "stopped" in "\n".join(_render(table, 80))
    assert notes == []


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (-3, "0s"), (4.4, "4s"), (59, "59s"), (61, "1m"), (7200, "2h"), (86400 * 3, "3d")],
)
def test_ago(seconds: float | None, shown: str) -> None:
    assert cliformat.ago(seconds) == shown


@pytest.mark.parametrize(
    ("text", "source", "message"),
    [
        (
            '{"tasks": [\n  {"id": "a",}\n]}',
            "flow.json",
            "flow.json is not valid JSON: Expecting property name",
        ),
        ('{"tasks": [\n  {"id": "a",}\n]}', "flow.json", "at line 2 column 14"),
        ('{"tasks": [1, 2}', "flow.JSON", "at line 1 column 16"),
        ("tasks: [a, b\nx: 1", "flow.yaml", "flow.yaml is neither valid JSON nor valid YAML"),
        ("tasks: [a, b\nx: 1", "-", "at line 2 column"),
    ],
)
def test_parse_document_errors(text: str, source: str, message: str) -> None:
    with pytest.raises(cliformat.DocumentError) as caught:
        cliformat.parse_document(text, source)

    assert message in str(caught.value)
    if source.lower().endswith(".json"):
        assert "YAML" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "source", "parsed"),
    [
        ('{"tasks": ["…"]}', "a.json", {"tasks": ["…"]}),
        ("- id: a\n", "a.yaml", [{"id": "a"}]),
        ("[1]", "-", [1]),
    ],
)
def test_parse_document(text: str, source: str, parsed: Any) -> None:
    assert cliformat.parse_document(text, source) == parsed


def test_import_failure_of_a_syntax_error_is_one_line() -> None:
    try:
        compile("def broken(:\n", "/src/myagents.py", "exec")
    except SyntaxError as exc:
        line = cliformat.import_failure("myagents", exc)

    assert line == "cannot import module myagents: /src/myagents.py:1: SyntaxError: invalid syntax"


def test_import_failure_names_the_line_that_raised() -> None:
    namespace: dict[str, Any] = {}
    try:
        exec(compile("x = 1\nraise RuntimeError('no API key')\n", "/src/myagents.py", "exec"), namespace)
    except RuntimeError as exc:
        line = cliformat.import_failure("myagents", exc)

    assert line == "cannot import module myagents: /src/myagents.py:2: RuntimeError: no API key"


@pytest.mark.parametrize(
    ("target", "agents", "found", "message"),
    [
        (
            "workers.demo:nosuch",
            ["agent"],
            cliformat.MISSING,
            "module workers.demo has no attribute 'nosuch'; its Agents: workers.demo:agent",
        ),
        ("m:x", [], cliformat.MISSING, "module m has no attribute 'x'; it defines no fabric.Agent"),
        (
            "m:helper",
            ["a", "b"],
            len,
            "m:helper is a builtin_function_or_method, not a fabric.Agent; its Agents: m:a, m:b",
        ),
        ("m:nothing", ["a"], None, "m:nothing is a NoneType, not a fabric.Agent; its Agents: m:a"),
    ],
)
def test_missing_agent(target: str, agents: list[str], found: Any, message: str) -> None:
    assert cliformat.missing_agent(target, agents, found) == message


@pytest.mark.parametrize(
    ("text", "joined"),
    [
        (None, None),
        ("One line.", "One line."),
        (
            "Say why each task waits:\n    waiting_on, queued.\n\n    Exits 2 on bad input.",
            "Say why each task waits: waiting_on, queued.\n\nExits 2 on bad input.",
        ),
    ],
)
def test_join_paragraphs(text: str | None, joined: str | None) -> None:
    assert cliformat.join_paragraphs(text) == joined
