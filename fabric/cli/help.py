"""How ``fabric --help`` reads: Typer's command and group classes with plain metavars and whole lines.

Typer shows each option's Python type (``--json <bool>``, ``--task <str>``), wraps required arguments in
braces (``{source}``) and keeps a docstring's line breaks in the command list, so sentences break where
the source did. These subclasses name values as click does (``SOURCE``, ``--task TASK``), show nothing
after a flag, and join each help paragraph into one line for the terminal to wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.models import CommandFunctionType

from fabric.cli.format import join_paragraphs


class _Argument(TyperArgument):
    """An argument whose help shows its name (the metavar) and no Python type next to it."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _tidy(param: Any) -> None:
    """Give ``param`` a click-style metavar: none for a flag, its name in capitals otherwise."""
    if type(param) is TyperArgument:
        param.__class__ = _Argument
    if getattr(param, "metavar", None) is not None:
        return
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        param.metavar = ""
    else:
        param.metavar = (param.name or "value").upper()


def _usage(command: Any, ctx: Any) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name != "argument":
            continue
        name = param.metavar or (param.name or "").upper()
        if getattr(param, "nargs", 1) != 1:
            name += "..."
        pieces.append(name if param.required else f"[{name}]")
    return pieces


class FabricCommand(TyperCommand):
    """A Typer command whose help shows plain metavars and whole paragraphs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = join_paragraphs(kwargs.get("help"))
        super().__init__(*args, **kwargs)
        for param in self.params:
            _tidy(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _tidy(option)
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage(self, ctx)


class FabricGroup(TyperGroup):
    """A Typer group whose help shows whole paragraphs, and a bare ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "help" in kwargs:
            kwargs["help"] = join_paragraphs(kwargs["help"])
        super().__init__(*args, **kwargs)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _tidy(option)
        return option


class FabricTyper(typer.Typer):
    """``typer.Typer`` whose groups and commands are :class:`FabricGroup` and :class:`FabricCommand`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", FabricGroup)
        super().__init__(**kwargs)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls or FabricCommand, **kwargs)
