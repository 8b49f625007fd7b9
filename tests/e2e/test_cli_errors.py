"""Errors of the real `fabric` CLI (run as a subprocess) say what is wrong, in one line, with the exit code
of bad input (2) or of an unreachable broker (3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.transport.amqp import GREETING_TIMEOUT_S
from tests.e2e.conftest import Fleet, fabric_command, run_cli

pytestmark = [pytest.mark.e2e]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env.update(
        FABRIC_NAMESPACE="t-cli-errors",
        FABRIC_STORE__URL=f"sqlite:///{tmp_path / 'fabric.db'}",
        FABRIC_HTTP__PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_malformed_json_file_gets_the_json_error(tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    path.write_text('{"tasks": [\n  {"id": "a", "capability": "demo.echo",}\n]}\n')

    done = run_cli(_env(tmp_path), "submit", str(path))

    assert done.returncode == 2, done.stderr
    assert f"{path} is not valid JSON: Expecting property name enclosed in double quotes" in done.stderr
    assert "at line 2 column 41" in done.stderr
    assert "YAML" not in done.stderr
    assert len(_lines(done.stderr)) == 1, done.stderr


@pytest.mark.rabbitmq
def test_wrong_vhost_names_the_vhost_and_the_user(tmp_path: Path, amqp_url: str) -> None:
    url = amqp_url.rstrip("/") + "/no-such-vhost"

    done = run_cli(_env(tmp_path, FABRIC_AMQP_URL=url), "status", "some-workflow")

    assert done.returncode == 3, done.stderr
    assert "the broker refused virtual host 'no-such-vhost' for user 'guest'" in done.stderr
    assert "Connection.OpenOk" not in done.stderr
    assert len(_lines(done.stderr)) == 1, done.stderr


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (not an AMQP broker)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_a_port_that_is_not_amqp_fails_fast_and_says_so(tmp_path: Path, silent_port: int) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{silent_port}/"
    started = time.monotonic()

    done = run_cli(_env(tmp_path, FABRIC_AMQP_URL=url), "status", "some-workflow")

    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert f"no AMQP greeting within {GREETING_TIMEOUT_S:g}s: this is not an AMQP server" in done.stderr
    assert elapsed < 12, f"took {elapsed:.1f}s (the connect timeout is 15s)"
    assert len(_lines(done.stderr)) == 1, done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("command", [["status", "some-workflow"], ["dead", "list"]])
def test_a_refused_connection_is_one_line(tmp_path: Path, command: list[str]) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"

    done = run_cli(_env(tmp_path, FABRIC_AMQP_URL=url), *command)

    assert done.returncode == 3, done.stderr
    assert _lines(done.stderr) == [_lines(done.stderr)[0]]
    assert done.stderr.startswith("error: cannot connect to the broker at amqp://guest:***@127.0.0.1:")
    assert "error when creating transport" not in done.stderr


def test_a_missing_agent_attribute_names_the_modules_agents(tmp_path: Path) -> None:
    done = run_cli(_env(tmp_path), "worker", "workers.demo:nosuch")

    assert done.returncode == 2, done.stderr
    assert "module workers.demo has no attribute 'nosuch'; its Agents: workers.demo:agent" in done.stderr
    assert "NoneType" not in done.stderr


def test_an_agent_module_with_a_syntax_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "brokenagents.py").write_text("from fabric import Agent\nagent = Agent('x'\nx = 1\n")

    done = subprocess.run(
        [*fabric_command(), "worker", "brokenagents:agent"],
        env=_env(tmp_path, PYTHONPATH=os.pathsep.join(sys.path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert len(_lines(done.stderr)) == 1, done.stderr
    assert "brokenagents.py:2: SyntaxError: " in done.stderr
    assert "Traceback" not in done.stderr


def test_an_http_url_is_refused_as_the_amqp_url(tmp_path: Path) -> None:
    done = run_cli(_env(tmp_path, FABRIC_AMQP_URL="http://127.0.0.1:15672/"), "status", "some-workflow")

    assert done.returncode == 2, done.stderr
    assert "FABRIC_AMQP_URL" in done.stderr
    assert "must be an AMQP URL" in done.stderr
    assert "not http://" in done.stderr


def test_an_unknown_setting_suggests_the_closest(tmp_path: Path) -> None:
    done = run_cli(_env(tmp_path, FABRIC_WORKER__CONCURENCY="4"), "worker", "workers.demo:agent")

    assert done.returncode == 2, done.stderr
    assert (
        "unknown setting FABRIC_WORKER__CONCURENCY: did you mean FABRIC_WORKER__CONCURRENCY?" in done.stderr
    )


@pytest.mark.rabbitmq
async def test_wait_timeout_is_reported_as_given(fleet: Fleet) -> None:
    await fleet.router()
    # No worker serves demo.echo here: the workflow cannot finish.
    done = run_cli(
        fleet.env,
        "submit",
        "-",
        "--wait",
        "--timeout",
        "1.5",
        stdin='{"tasks": [{"id": "a", "capability": "demo.echo", "input": 1}]}',
    )

    assert done.returncode == 3, done.stderr
    assert "did not finish within 1.5s" in done.stderr
