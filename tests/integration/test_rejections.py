"""Every bad submission gets the documented `rejected` reply.

Nothing is queued or stored, and the router keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import msgpack
import pytest

from fabric import FabricClient
from fabric.router.service import Router
from fabric.settings import FabricSettings, load_settings
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection
from tests.integration.conftest import StartWorker
from workers.demo import agent as demo

pytestmark = pytest.mark.rabbitmq


class RawClient:
    """Publishes raw bytes to {ns}.submit with aio-pika and reads the reply, as a non-Python client would."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue, ns: str
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.ns = ns

    async def submit(self, body: bytes, content_type: str | None, message_id: str) -> dict[str, Any]:
        exchange = await self.channel.get_exchange(names.submit_exchange(self.ns))
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type=content_type,
                message_id=message_id,
                reply_to=self.queue.name,
                correlation_id=message_id,
            ),
            routing_key="workflow",
        )
        async with self.queue.iterator(timeout=30) as messages:
            async for message in messages:
                async with message.process():
                    assert message.correlation_id == message_id
                    kind = (message.content_type or "").split(";")[0]
                    return dict(
                        json.loads(message.body)
                        if kind == "application/json"
                        else msgpack.unpackb(message.body)
                    )
        raise AssertionError("no reply")


@pytest.fixture
async def raw(settings: FabricSettings, router: Router) -> AsyncIterator[RawClient]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True)
    yield RawClient(channel, queue, settings.namespace)
    await connection.close()


def js(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def task(task_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "capability": "demo.echo", "depends_on": list(deps), **extra}


CASES: list[tuple[str, bytes, str | None, str, str]] = [
    (
        "cycle",
        js({"tasks": [task("a", "c"), task("b", "a"), task("c", "b")]}),
        "application/json",
        "cycle",
        "dependency cycle: a -> b -> c -> a",
    ),
    ("self-loop", js({"tasks": [task("a", "a")]}), "application/json", "cycle", "a -> a"),
    (
        "unknown dependency",
        js({"tasks": [task("a", "ghost")]}),
        "application/json",
        "unknown_dependency",
        "ghost",
    ),
    ("duplicate id", js({"tasks": [task("a"), task("a")]}), "application/json", "duplicate_task_id", "a"),
    ("malformed msgpack", b"\xc1\xc1\xc1", "application/msgpack", "malformed", "msgpack"),
    ("malformed json", b"{not json", "application/json", "malformed", "json"),
    ("not an object", js([1, 2]), "application/json", "malformed", "list"),
    ("wrong content type", b"<xml/>", "text/xml", "unsupported_content_type", "text/xml"),
    ("no content type", js({"tasks": [task("a")]}), None, "unsupported_content_type", "None"),
    ("no tasks", js({"tasks": []}), "application/json", "invalid", "tasks"),
    ("missing capability", js({"tasks": [{"id": "a"}]}), "application/json", "invalid", "capability"),
    (
        "bad capability",
        js({"tasks": [{"id": "a", "capability": "Not Valid!"}]}),
        "application/json",
        "invalid",
        "capability",
    ),
    (
        "priority out of range",
        js({"tasks": [task("a", priority=12)]}),
        "application/json",
        "invalid",
        "priority",
    ),
    ("unknown field", js({"tasks": [task("a", depends=["x"])]}), "application/json", "invalid", "depends"),
    (
        "bad workflow id",
        js({"workflow_id": "has space", "tasks": [task("a")]}),
        "application/json",
        "invalid",
        "workflow_id",
    ),
    (
        "priority is a boolean",
        js({"tasks": [task("a", priority=False)]}),
        "application/json",
        "invalid",
        "priority",
    ),
    (
        "max_attempts zero",
        js({"tasks": [task("a", max_attempts=0)]}),
        "application/json",
        "invalid",
        "max_attempts",
    ),
]


@pytest.mark.parametrize(
    ("label", "body", "content_type", "reason", "mention"), CASES, ids=[c[0] for c in CASES]
)
async def test_rejection(
    raw: RawClient,
    router: Router,
    broker: AmqpConnection,
    settings: FabricSettings,
    label: str,
    body: bytes,
    content_type: str | None,
    reason: str,
    mention: str,
) -> None:
    reply = await raw.submit(body, content_type, message_id=f"bad-{label}")
    assert reply["kind"] == "rejected"
    assert reply["reason"] == reason
    assert mention in reply["detail"] or mention in json.dumps(reply["errors"]), reply
    # Nothing was queued for any agent, nothing stored.
    info = await broker.queue_info(names.capability_queue(settings.namespace, "demo.echo"))
    assert info is None or info.messages == 0
    assert await router.store.list_workflows() == []
    # And the router keeps serving valid submissions.
    good = await raw.submit(js({"tasks": [task("ok")]}), "application/json", message_id=f"good-after-{label}")
    assert good["kind"] == "accepted"


async def test_oversize_body_is_rejected(
    amqp_url: str, namespace: str, tmp_path: Any, broker: AmqpConnection
) -> None:
    small = load_settings(
        namespace=namespace,
        amqp_url=amqp_url,
        store={"url": f"sqlite:///{tmp_path / 'f.db'}"},
        router={"max_body_bytes": 2048},
    )
    async with Router(small) as router, FabricClient(small) as client:
        big = {"tasks": [task("a", input="x" * 5000)]}
        reply = await RawClient(*(await _raw_channel(amqp_url)), namespace).submit(
            js(big), "application/json", "big-1"
        )
        assert reply["kind"] == "rejected"
        assert reply["reason"] == "too_large"
        assert "2048" in reply["detail"]
        assert await router.store.list_workflows() == []
        accepted = await client.submit({"tasks": [task("small", input="ok")]})
        assert accepted.tasks == 1


async def _raw_channel(url: str) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    return channel, await channel.declare_queue("", exclusive=True, auto_delete=True)


async def test_msgpack_submission_gets_msgpack_replies(raw: RawClient, start_worker: StartWorker) -> None:
    await start_worker(demo)
    body = msgpack.packb({"tasks": [{"id": "bin", "capability": "demo.echo", "input": b"\x00\x01"}]})
    reply = await raw.submit(body, "application/msgpack", message_id="mp-1")
    assert reply["kind"] == "accepted"
