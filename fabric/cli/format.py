"""Pure helpers of the ``fabric`` command line: reading documents, picking parked messages by a part of
their id, naming what an agent module holds, and the tables the commands print. No I/O here: the
commands of :mod:`fabric.cli` read, call these and print.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.table import Table
from rich.text import Text


class DocumentError(ValueError):
    """A workflow or input document that cannot be parsed; the message names the file and position."""


def parse_document(text: str, source: str, what: str = "") -> Any:
    """The JSON or YAML document in ``text``; a ``.json`` file is read as JSON only, so its errors are
    JSON's (line and column), not the YAML parser's.

    Example:
        >>> parse_document('{"tasks": []}', "flow.json")
        {'tasks': []}

    Raises:
        DocumentError: the text is not valid JSON (``.json``) or YAML (anything else; JSON is YAML).
    """
    label = f"{what} {source}".strip()
    if source.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DocumentError(
                f"{label} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1} column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DocumentError(f"{label} is neither valid JSON nor valid YAML: {problem}{where}") from exc


def import_failure(module_name: str, exc: BaseException) -> str:
    """One line saying why importing an agent module failed: ``file:line: error`` where the error is.

    Example:
        >>> import_failure("myagents", SyntaxError("invalid syntax", ("myagents.py", 3, 5, "x y\\n")))
        'cannot import module myagents: myagents.py:3: SyntaxError: invalid syntax'
    """
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}"
        return f"cannot import module {module_name}: {where}: {type(exc).__name__}: {exc.msg}"
    if isinstance(exc, ImportError) and exc.__traceback__ is None:
        return f"cannot import module {module_name!r}: {exc}"
    frames = list(_frames(exc))
    where = f"{frames[-1][0]}:{frames[-1][1]}: " if frames else ""
    return f"cannot import module {module_name}: {where}{type(exc).__name__}: {exc}"


def _frames(exc: BaseException) -> Iterable[tuple[str, int]]:
    """(file, line) of each traceback frame outside the import machinery and the command line."""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        path = Path(filename)
        if not filename.startswith("<frozen") and path.name != "__init__.py" and path.parent != _CLI_DIR:
            yield filename, tb.tb_lineno
        tb = tb.tb_next


#: The command line's own files: their frames are not where an agent module failed.
_CLI_DIR = Path(__file__).parent


#: Stands for an attribute the module does not have, in :func:`missing_agent`.
MISSING: Any = object()


def missing_agent(target: str, agents: Sequence[str], found: Any = MISSING) -> str:
    """Why ``module:attr`` names no agent (the attribute is missing, or ``found`` is no Agent), naming
    the Agents the module does have.

    Example:
        >>> missing_agent("workers.demo:nosuch", ["agent"])
        "module workers.demo has no attribute 'nosuch'; its Agents: workers.demo:agent"
    """
    module_name, _, attr = target.partition(":")
    hint = (
        f"; its Agents: {', '.join(f'{module_name}:{a}' for a in agents)}"
        if agents
        else "; it defines no fabric.Agent"
    )
    if found is MISSING:
        return f"module {module_name} has no attribute {attr!r}{hint}"
    return f"{target} is a {type(found).__name__}, not a fabric.Agent{hint}"


def pick_ids(wanted: str, views: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct ids of the parked messages that ``wanted`` names, in listing order: its exact id;
    else every id it begins (a unique prefix), ends (``task/attempt``) or whose task id it is.

    Example:
        >>> views = [{"id": "wf-1/score/1", "task_id": "score"}, {"id": "wf-1/score/2", "task_id": "score"}]
        >>> pick_ids("score/2", views), pick_ids("score", views)
        (['wf-1/score/2'], ['wf-1/score/1', 'wf-1/score/2'])
    """
    ids = list(dict.fromkeys(str(v["id"]) for v in views))
    if wanted in ids:
        return [wanted]
    tasks = {str(v["id"]): v.get("task_id") for v in views}
    return [i for i in ids if i.startswith(wanted) or i.endswith(f"/{wanted}") or tasks.get(i) == wanted]


def ago(seconds: float | None) -> str:
    """``12s``, ``5m``, ``3h``, ``2d``: a short age for tables (``-`` when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def dead_table(rows: Sequence[Mapping[str, Any]], width: int) -> Table:
    """The table of ``fabric dead list`` at ``width`` columns: full ids (what ``dead show`` and ``dead
    replay`` take), never cut. The last error gets a column of its own when there is room for one, else
    it goes on the lines under the id."""
    ids = [str(r["id"]) for r in rows]
    id_width = max([len("id"), *map(len, ids)])
    reason_width = max([len("reason"), *(len(str(r["reason"])) for r in rows)])
    # Two spaces between columns; "attempt" and "age" (at most 3 characters) are the widest there.
    room = width - id_width - reason_width - len("attempt") - len("age") - 4 * 2 - 2
    apart = room >= _MIN_ERROR_WIDTH
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("id" if apart else "id / last error", no_wrap=True, min_width=id_width)
    table.add_column("reason", no_wrap=True)
    table.add_column("attempt", no_wrap=True, justify="right")
    table.add_column("age", no_wrap=True, justify="right")
    if apart:
        table.add_column("last error", overflow="fold", max_width=room)
    for label, row in zip(ids, rows, strict=True):
        error = _parked_error(row)
        cells: list[Text | str] = [Text(str(row["reason"])), str(row["attempt"] or "-"), ago(row["age_s"])]
        if apart:
            table.add_row(Text(label), *cells, Text(textwrap.fill(error, room, break_long_words=True) or "-"))
        else:
            cell = Text(label)
            for line in textwrap.wrap(error, max(id_width - 2, 10), break_long_words=True):
                cell.append(f"\n  {line}", style="dim")
            table.add_row(cell, *cells)
    return table


#: Narrower than this, the last error goes under the id instead of into a column of its own.
_MIN_ERROR_WIDTH = 24


def _parked_error(row: Mapping[str, Any]) -> str:
    """The last error, after the capability when the id does not name a task (a message that is none)."""
    error = str(row.get("last_error") or "")[:300]
    if row.get("task_id") or not row.get("capability"):
        return error
    return f"[{row['capability']}] {error}".strip()


def agents_table(agents: Sequence[Mapping[str, Any]], now: float) -> tuple[Table, list[str]]:
    """The table of ``fabric agents``, readable at 80 columns: each agent's capabilities (score, and the
    breaker when it is not closed) one per line under its id; the reasons of unhealthy agents come back
    as notes to print below.

    Returns:
        The table and the notes (``agent: state: reason``).
    """
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("agent / capabilities (score)", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("load", no_wrap=True, justify="right")
    table.add_column("done", no_wrap=True, justify="right")
    table.add_column("failed", no_wrap=True, justify="right")
    table.add_column("seen", no_wrap=True, justify="right")
    notes = []
    for agent in agents:
        state = str(agent.get("state", "?"))
        if state == "alive" and agent.get("health") == "draining":
            state = "draining"
        if agent.get("reason") and state not in ("alive", "draining"):
            notes.append(f"{agent['agent_id']}: {state}: {agent['reason']}")
            state += "*"
        style = "red" if state.startswith("unhealthy") else "yellow" if state.startswith("lost") else ""
        cell = Text(str(agent["agent_id"]), style="bold")
        for line in capability_lines(agent):
            cell.append(f"\n  {line}")
        table.add_row(
            cell,
            Text(state, style=style),
            f"{agent.get('in_flight', 0)}/{agent.get('concurrency', '?')}",
            str(agent.get("processed", 0)),
            str(agent.get("failed", 0)),
            ago(now - agent["last_seen"]) if agent.get("last_seen") else "-",
        )
    return table, notes


def capability_lines(agent: Mapping[str, Any]) -> list[str]:
    """``cap (score)`` per capability, with ``breaker open`` after one whose breaker is not closed."""
    lines = []
    for capability in agent.get("capabilities") or []:
        consumer = (agent.get("consumers") or {}).get(capability) or {}
        score = consumer.get("score")
        line = capability if score is None else f"{capability} ({score})"
        breaker = (agent.get("breakers") or {}).get(capability, "closed")
        lines.append(line if breaker == "closed" else f"{line} breaker {breaker}")
    return lines


def join_paragraphs(text: str | None) -> str | None:
    """Help text with each paragraph on one line: a docstring's line breaks fall mid-sentence once the
    terminal is wider or narrower than the source. Paragraphs stay apart (blank lines)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)
