"""The project's own documents stand alone: nothing shipped refers to a design document users do not have.

docs/protocol.md is the contract; README, docstrings, the OpenAPI and AsyncAPI descriptions, configs and
examples must point there, never to the design notes the project was built from.
"""

from __future__ import annotations

import json
from pathlib import Path

from fabric.asyncapi import asyncapi_document

ROOT = Path(__file__).resolve().parents[2]
#: Built in two pieces so this file does not mention it itself.
UNSHIPPED = "design" + ".md"
#: Directories that are not shipped (tests, caches, virtualenvs, VCS data).
SKIPPED_DIRS = {"tests", ".git", "__pycache__", ".venv", "venv", ".mypy_cache", ".ruff_cache", "node_modules"}


def shipped_files() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts):
            continue
        if path.is_file() and path.stat().st_size < 2_000_000:
            found.append(path)
    return found


def test_the_scan_covers_the_documents_users_read() -> None:
    names = {str(path.relative_to(ROOT)) for path in shipped_files()}
    assert {"README.md", "docs/protocol.md", "fabric/router/http/api.py", "workers/demo.py"} <= names


def test_no_shipped_file_mentions_the_design_notes() -> None:
    offenders = []
    for path in shipped_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images and other binary files
        for number, line in enumerate(text.splitlines(), 1):
            if UNSHIPPED in line.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "refer to docs/protocol.md instead:\n" + "\n".join(offenders)


def test_the_asyncapi_document_does_not_mention_the_design_notes() -> None:
    assert UNSHIPPED not in json.dumps(asyncapi_document("fabric")).lower()
