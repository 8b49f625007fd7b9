"""``fabric docs``: documents generated from the code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from fabric.cli.app import app, console, die, get_settings
from fabric.cli.help import FabricTyper

docs_app = FabricTyper(
    help="Documents generated from the code: the AsyncAPI description of the wire contract."
)
app.add_typer(docs_app, name="docs")


@docs_app.command("asyncapi")
def docs_asyncapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="yaml or json (default: from the file name, else yaml).")
    ] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of the exchanges, queues and messages (generated from the code).

    The namespace is FABRIC_NAMESPACE (default fabric). Example: fabric docs asyncapi -o asyncapi.yaml
    """
    from fabric.asyncapi import asyncapi_document

    settings = get_settings()
    kind = fmt or ("json" if output is not None and output.suffix == ".json" else "yaml")
    if kind not in ("yaml", "json"):
        die(f"--format must be yaml or json, not {kind!r}", 2)
    document = asyncapi_document(settings.namespace)
    text = (
        json.dumps(document, indent=2) + "\n"
        if kind == "json"
        else yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    )
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        die(f"cannot write {output}: {exc}", 2)
    console.print(f"AsyncAPI document of namespace {settings.namespace!r} written to {output}")
