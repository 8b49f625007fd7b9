"""The root of the ``fabric`` command line: the Typer app, the consoles, and what every command shares:
building settings, logging, and turning fabric errors into messages and exit codes.

Exit codes: 0 success; 1 the workflow failed or was cancelled; 2 bad usage, input or settings;
3 the broker or router cannot be reached; 4 the router rejected the submission or refused the command
(e.g. resuming a task that is not escalated); 5 not found (workflow or task).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fabric.cli.help import FabricTyper
from fabric.errors import (
    ConfigError,
    FabricError,
    RequestRefused,
    SubmissionRejected,
    TopologyMismatch,
    TransportError,
    WaitTimeout,
    WorkflowNotFound,
)
from fabric.settings import FabricSettings, load_settings

app = FabricTyper(
    help="fabric: run AI agents and other workers over RabbitMQ, reliably and observably.\n\n"
    "Settings come from FABRIC_* environment variables (FABRIC_AMQP_URL, FABRIC_NAMESPACE, "
    "FABRIC_STORE__URL, ...) and the profile file configs/<FABRIC_PROFILE>.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def die(message: str, code: int) -> NoReturn:
    """Print ``message`` as an error on standard error and exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def get_settings(**overrides: Any) -> FabricSettings:
    """The settings from the environment and profile, with the ``overrides`` that are not None; exits
    2 when they are invalid."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        die(str(exc), 2)


def setup_logging(settings: FabricSettings) -> None:
    """Log to standard error at the configured level; the AMQP libraries only from WARNING up."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    # httpx logs each webhook POST at INFO with its full URL, whose query may hold a token.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run(coro: Any) -> Any:
    """Run ``coro``, turning fabric errors into clear messages and exit codes."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        die(str(exc), 2)
    except TopologyMismatch as exc:
        die(f"broker topology drift: {exc}", 2)
    except WorkflowNotFound as exc:
        die(str(exc), 5)
    except SubmissionRejected as exc:
        die(f"rejected ({exc.reason}): {exc.detail}", 4)
    except RequestRefused as exc:
        die(f"refused: {exc}", 5 if exc.not_found else 4)
    except (TransportError, WaitTimeout) as exc:
        die(str(exc), 3)
    except FabricError as exc:
        die(str(exc), 2)


async def until_signalled(stop: asyncio.Event) -> None:
    """Return once SIGTERM or SIGINT arrives (``stop`` is set then)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
