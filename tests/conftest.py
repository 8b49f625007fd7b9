"""Shared fixtures: real brokers (testcontainers where a Docker engine answers, else the local services),
a unique namespace per test that is deleted afterwards, and in-process router/worker/client."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from fabric import FabricClient, load_settings
from fabric.settings import FabricSettings
from fabric.topology import spec
from fabric.transport.amqp import AmqpConnection
from workers.demo import agent as demo_agent

IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@functools.cache
def _docker_engine() -> bool:
    """True when a Docker engine answers (then testcontainers can start brokers)."""
    if not Path("/var/run/docker.sock").exists() and not os.environ.get("DOCKER_HOST"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        engine = docker.from_env(timeout=2)
        try:
            return bool(engine.ping())
        finally:
            engine.close()
    except Exception:
        return False


def _unavailable(what: str, url: str) -> None:
    message = f"{what} is not reachable at {url}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: the services must run; .ci/run starts them)")
    pytest.skip(f"{message}; start it or set the URL to run these tests")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A real RabbitMQ: FABRIC_AMQP_URL, else a testcontainer where Docker runs, else the local broker."""
    explicit = os.environ.get("FABRIC_AMQP_URL")
    if not explicit and _docker_engine():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.10") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    url = explicit or "amqp://guest:guest@127.0.0.1:5672/"
    if not _reachable(url):
        _unavailable("RabbitMQ", url)
    yield url


#: consumer_timeout of the node started by `short_timeout_amqp_url` (ms): tasks outlive it in a few seconds.
SHORT_CONSUMER_TIMEOUT_MS = 2000


@pytest.fixture(scope="session")
def short_timeout_amqp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ node of its own with ``consumer_timeout`` of 2 s (checked every 0.5 s), for the long-task
    tests; started once per session as a child process, stopped at the end (see tests/brokernode.py)."""
    from tests.brokernode import BrokerNode, BrokerNodeError, find_server

    if find_server() is None:
        message = "rabbitmq-server is not installed: the long-task tests start a broker node of their own"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: install the rabbitmq-server package)")
        pytest.skip(message)
    node = BrokerNode(tmp_path_factory.mktemp("rabbit-node"), consumer_timeout_ms=SHORT_CONSUMER_TIMEOUT_MS)
    try:
        node.start()
    except BrokerNodeError as exc:
        pytest.fail(f"could not start a RabbitMQ node with a short consumer_timeout: {exc}", pytrace=False)
    try:
        yield node.url
    finally:
        node.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: TEST_REDIS_URL, else a testcontainer where Docker runs, else the local server."""
    explicit = os.environ.get("TEST_REDIS_URL")
    if not explicit and _docker_engine():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    url = explicit or "redis://127.0.0.1:6379/0"
    if not _reachable(url):
        _unavailable("Redis", url)
    yield url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so queues never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


#: Capabilities whose queues every test's teardown deletes (tests add their own through `extra_caps`).
DEMO_CAPABILITIES = tuple(demo_agent.capabilities)


@pytest.fixture
def extra_caps() -> list[str]:
    """Capabilities a test uses beyond the demo ones; appended to so teardown deletes their queues."""
    return []


@pytest.fixture
async def broker(
    amqp_url: str, namespace: str, extra_caps: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[AmqpConnection]:
    """A raw connection for the test itself; deletes the namespace's whole topology afterwards."""
    async with AmqpConnection(amqp_url, name=request.node.nodeid[:200]) as amqp:
        yield amqp
        await amqp.delete(spec.build(namespace, [*DEMO_CAPABILITIES, *extra_caps]))


@pytest.fixture
def settings(amqp_url: str, namespace: str, tmp_path: Path, broker: AmqpConnection) -> FabricSettings:
    """Settings for this test: its namespace, the real broker, a SQLite store in tmp_path."""
    return load_settings(
        namespace=namespace,
        amqp_url=amqp_url,
        store={"url": f"sqlite:///{tmp_path / 'fabric.db'}"},
        worker={"heartbeat_interval_s": 0.5, "drain_timeout_s": 5},
        http={"port": 0},
    )


@pytest.fixture
async def client(settings: FabricSettings) -> AsyncIterator[FabricClient]:
    async with FabricClient(settings, reply_timeout_s=60) as c:
        yield c


def subprocess_env(settings: FabricSettings, **extra: str) -> dict[str, str]:
    """Environment for a `fabric` subprocess using the test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env.update(
        FABRIC_NAMESPACE=settings.namespace,
        FABRIC_AMQP_URL=settings.amqp_url.get_secret_value(),
        FABRIC_STORE__URL=settings.store.url,
        FABRIC_WORKER__HEARTBEAT_INTERVAL_S="0.5",
        FABRIC_LOG_LEVEL="INFO",
        FABRIC_HTTP__PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


async def eventually(
    predicate: Any, *, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


async def cli(settings: FabricSettings, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run the fabric CLI without blocking the event loop (an in-process router may have to answer it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fabric.cli",
        *args,
        env=subprocess_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
