"""Every command's --help: values named as click does (no Python types such as <bool> or <str>, no
{placeholder} braces), and help paragraphs kept whole instead of broken where the docstring's lines
were."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fabric import cli

#: A Python type as Typer prints it next to a parameter: <bool>, <str>, <float>, <list[str]>...
TYPE_TOKEN = re.compile(r"<(bool|str|int|float|path|text|list\[[^\]]*\]|[a-z_]+\|[a-z_|]+)>")
#: A {placeholder}: Typer's required-argument braces, or a template name left in a docstring.
PLACEHOLDER = re.compile(r"\{[A-Za-z_]+\}")


def _commands() -> Iterator[tuple[list[str], Any]]:
    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk([*path, name], sub)

    yield from walk([], typer.main.get_command(cli.app))


COMMANDS = list(_commands())


def _help(path: list[str], columns: int) -> str:
    result = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": str(columns), "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "submit", "worker", "dead", "dead show", "dead replay", "agents", "abort"} <= names


@pytest.mark.parametrize("columns", [80, 300])
@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "fabric" for p, _ in COMMANDS])
def test_help_names_values_plainly(path: list[str], command: Any, columns: int) -> None:
    text = _help(path, columns)

    assert not TYPE_TOKEN.findall(text), text
    assert not PLACEHOLDER.findall(text), text


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "fabric" for p, _ in COMMANDS])
def test_help_paragraphs_are_not_broken_mid_sentence(path: list[str], command: Any) -> None:
    """On a terminal wide enough, each paragraph of the help, and each subcommand's summary in the list,
    is one line: line breaks come from the terminal's width, not from where the source was wrapped."""
    lines = [" ".join(line.strip(" │").split()) for line in _help(path, 300).splitlines()]
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(command.help or "").split("\n\n")]
    for paragraph in paragraphs:
        assert any(paragraph in line for line in lines), f"{paragraph!r} is broken over lines"
    for name, sub in getattr(command, "commands", {}).items():
        summary = " ".join(inspect.cleandoc(sub.help or "").split("\n\n")[0].split())
        assert any(line.startswith(name) and summary in line for line in lines), (
            f"the summary of {name} is broken over lines: {summary!r}"
        )
