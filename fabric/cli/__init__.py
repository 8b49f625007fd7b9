"""The ``fabric`` command line: thin wrappers that build settings and call the services.

One module per command group, each registering its commands on :data:`app` (defined in
:mod:`fabric.cli.app` with the options, errors and exit codes they share): :mod:`~fabric.cli.processes`
(router, worker), :mod:`~fabric.cli.workflows` (submit, status, result, cancel, why),
:mod:`~fabric.cli.escalations` (resume, abort), :mod:`~fabric.cli.agents`, :mod:`~fabric.cli.demo`,
:mod:`~fabric.cli.dead`, :mod:`~fabric.cli.topology` and :mod:`~fabric.cli.docs`. The pure helpers are in
:mod:`~fabric.cli.format` and the help layout in :mod:`~fabric.cli.help`.

Exit codes: 0 success; 1 the workflow failed or was cancelled; 2 bad usage, input or settings;
3 the broker or router cannot be reached; 4 the router rejected the submission or refused the command
(e.g. resuming a task that is not escalated); 5 not found (workflow or task).
"""

from __future__ import annotations

# Each module registers its commands on `app`; the order of these imports is the order of the
# commands in `fabric --help`, so the import sorter leaves them be.
# isort: off
from fabric.cli import processes, workflows, escalations, agents, demo  # noqa: F401
from fabric.cli import dead, topology, docs  # noqa: F401
from fabric.cli.app import app

# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``fabric`` console script."""
    app()
