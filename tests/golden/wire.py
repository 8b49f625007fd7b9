"""Recording what fabric puts on the broker, and turning it into golden records that compare byte for byte.

A :class:`Spy` is an exclusive queue of the test's own, bound to fabric's exchanges through a raw
``aiormq`` channel (no fabric code on the receiving side), that keeps every message as the broker
delivered it: exchange, routing key, every AMQP property, the header table and the body bytes.

:func:`record` turns one message into a JSON-able golden record. What varies from run to run is
normalised, by name, to a fixed value *of the same type* (an int stays an int, a float a float), so a
change of type, of order or of any other byte still shows:

* body fields ``at``, ``retry_at``, ``started_at``, ``free_since``, ``subscribed_at``,
  ``last_delivery_at`` (wall-clock times), ``pid`` and ``host`` (the test process), ``alert_id`` (a
  fresh uuid per alert), ``latency_ms`` (measured durations);
* headers ``fabric-dispatched-at-ms`` and ``fabric-parked-at-ms`` (wall-clock times);
* with tracing, the random trace and span ids inside ``traceparent``, ``fabric-previous-attempt`` and
  the values of ``fabric-links`` (``00-<trace-id>-<span-id>-01``: version and flags stay);
* headers starting with ``x-`` are dropped: the broker adds them (``x-death``, ``x-first-death-*``
  when a delayed retry is dead-lettered back to ``{ns}.tasks``), not fabric, and they differ between
  RabbitMQ versions;
* a ``message_id`` of 32 hex digits becomes ``<random-id>``: a message published without one (replies,
  notifications, control, alerts) gets a random uuid from aiormq, the AMQP client;
* the test's namespace in any text becomes ``{ns}``, the spy's auto-named queue ``{reply_queue}``.

A body is decoded (msgpack or JSON, by its content type), normalised, and encoded again the way fabric
encodes (``msgpack.packb(use_bin_type=True)``, compact ``json.dumps``); the record keeps those bytes in
hex (``body_hex``) and the decoded value for a readable diff (``body``). Re-encoding is checked to give
back the original bytes before normalising, so ``body_hex`` is the wire body with only the fields above
replaced.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import decimal
import difflib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import msgpack
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

#: The directory of the golden files.
GOLDEN_DIR = Path(__file__).parent
#: Set (to anything but ``0``) to write the golden files from what the code does now instead of comparing.
UPDATE_ENV = "UPDATE_GOLDEN"

#: Body keys holding wall-clock times (seconds since the epoch).
TIME_KEYS = frozenset({"at", "retry_at", "started_at", "free_since", "subscribed_at", "last_delivery_at"})
#: Other body keys that differ from run to run.
VOLATILE_KEYS = frozenset({"pid", "host", "alert_id", "latency_ms"})
#: Headers that differ from run to run (times, trace ids).
VOLATILE_HEADERS = frozenset({"fabric-dispatched-at-ms", "fabric-parked-at-ms"})
#: Headers holding a W3C traceparent, or a table of them.
TRACE_HEADERS = frozenset({"traceparent", "fabric-previous-attempt", "fabric-links"})
#: A W3C traceparent: version, trace id, span id, flags.
TRACEPARENT = re.compile(r"([0-9a-f]{2})-[0-9a-f]{32}-[0-9a-f]{16}-([0-9a-f]{2})")
#: A message id aiormq made up for a message published without one.
RANDOM_ID = re.compile(r"[0-9a-f]{32}")
#: AMQP basic properties, in the order of the AMQP spec.
PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


def updating() -> bool:
    """True when the golden files are to be written instead of compared."""
    return os.environ.get(UPDATE_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Message:
    """One message as the broker delivered it to the spy."""

    exchange: str
    routing_key: str
    properties: Basic.Properties
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    def decoded(self) -> Any:
        return _decode(self.body, self.properties.content_type)


class Spy:
    """An exclusive queue bound to the given exchanges, consumed without fabric code."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.messages: list[Message] = []
        self.last_at = time.monotonic()
        self.queue = ""
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Spy:
        self._connection = await aiormq.connect(self._url)
        self._channel = await self._connection.channel()
        declared = await self._channel.queue_declare("", exclusive=True, auto_delete=True)
        assert declared.queue is not None
        self.queue = declared.queue
        await self._channel.basic_consume(self.queue, self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def bind(
        self, exchange: str, routing_key: str = "", arguments: dict[str, Any] | None = None
    ) -> None:
        assert self._channel is not None
        await self._channel.queue_bind(self.queue, exchange, routing_key, arguments=arguments or {})

    async def _on_message(self, message: DeliveredMessage) -> None:
        self.messages.append(
            Message(
                message.exchange or "", message.routing_key or "", message.header.properties, message.body
            )
        )
        self.last_at = time.monotonic()

    async def take_back(self, queue: str, timeout: float = 30.0) -> None:
        """Get one message from ``queue`` and give it back unsettled: the broker redelivers it marked
        ``redelivered``, as it does when a consumer dies holding it."""
        assert self._channel is not None
        deadline = time.monotonic() + timeout
        while True:
            got = await self._channel.basic_get(queue, no_ack=False)
            if got.delivery_tag is not None:
                await self._channel.basic_nack(got.delivery_tag, requeue=True)
                return
            assert time.monotonic() < deadline, f"no message on {queue} within {timeout:g}s"
            await asyncio.sleep(0.05)

    def quiet_for(self, seconds: float) -> bool:
        return time.monotonic() - self.last_at >= seconds

    async def wait_quiet(self, seconds: float = 1.0, timeout: float = 30.0) -> None:
        """Wait until no message came for ``seconds`` (what follows an outcome has arrived)."""
        deadline = time.monotonic() + timeout
        while not self.quiet_for(seconds):
            assert time.monotonic() < deadline, f"messages kept coming for {timeout:g}s"
            await asyncio.sleep(0.05)


def record(message: Message, replace: dict[str, str]) -> dict[str, Any]:
    """The golden record of one message; ``replace`` maps text that differs per run to its placeholder."""
    props: dict[str, Any] = {}
    for name in PROPERTIES:
        value = getattr(message.properties, name, None)
        if name == "message_id" and isinstance(value, str) and RANDOM_ID.fullmatch(value):
            value = "<random-id>"
        if value is not None:
            props[name] = _jsonable(_scrub(value, replace))
    # None: the message has no header table at all (not even an empty one).
    headers = (
        None
        if message.properties.headers is None
        else [
            [name, _jsonable(_normal_header(name, _scrub(value, replace)))]
            for name, value in message.headers.items()
            if not name.startswith("x-")
        ]
    )
    result: dict[str, Any] = {
        "exchange": _scrub(message.exchange, replace),
        "routing_key": _scrub(message.routing_key, replace),
        "properties": props,
        "headers": headers,
    }
    content_type = message.properties.content_type
    try:
        value = _decode(message.body, content_type)
    except ValueError:
        result["body_hex"] = message.body.hex()
        return result
    if _encode(value, content_type) != message.body:
        raise AssertionError(
            f"re-encoding the body of {message.exchange}/{message.routing_key} does not give back its "
            "bytes: the golden test cannot normalise it faithfully"
        )
    normal = _normal_body(_scrub(value, replace))
    result["body"] = _jsonable(normal)
    result["body_hex"] = _encode(normal, content_type).hex()
    return result


def scenario(messages: list[Message], replace: dict[str, str]) -> list[dict[str, Any]]:
    """Golden records of a scenario's messages, in a stable order (messages from different connections
    reach the spy in no fixed order)."""
    records = [record(m, replace) for m in messages]
    return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def dumps(document: Any) -> str:
    """How golden files are written: indented JSON, keys in their own order, one newline at the end."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def check(name: str, document: Any) -> None:
    """Compare ``document`` with the golden file ``name`` (or write it when updating)."""
    path = GOLDEN_DIR / name
    text = dumps(document)
    if updating():
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with {UPDATE_ENV}=1 to write it"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = difflib.unified_diff(
            expected.splitlines(), text.splitlines(), f"{name} (golden)", f"{name} (now)", lineterm="", n=8
        )
        shown = list(itertools.islice(diff, 200))
        raise AssertionError(f"{name} changed ({UPDATE_ENV}=1 writes it anew):\n" + "\n".join(shown))


def _decode(body: bytes, content_type: str | None) -> Any:
    if content_type == "application/json":
        return json.loads(body)
    if content_type in (None, "application/msgpack"):
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError(str(exc)) from exc
    raise ValueError(f"not a body fabric encodes: {content_type}")


def _encode(value: Any, content_type: str | None) -> bytes:
    if content_type == "application/json":
        return json.dumps(value, separators=(",", ":")).encode()
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _same_type(value: Any) -> Any:
    """A fixed stand-in of the same type as ``value``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return 0
    if isinstance(value, float):
        return 0.0
    if isinstance(value, str):
        return "<normalised>"
    if isinstance(value, bytes):
        return b"<normalised>"
    raise AssertionError(f"cannot normalise a {type(value).__name__}")


def _normal_body(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _same_type(v) if k in TIME_KEYS or k in VOLATILE_KEYS else _normal_body(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_normal_body(v) for v in value]
    return value


def _normal_header(name: str, value: Any) -> Any:
    if name in VOLATILE_HEADERS:
        return _same_type(value)
    if name in TRACE_HEADERS:
        return _trace_ids(value)
    return value


def _trace_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _trace_ids(v) for k, v in value.items()}
    if isinstance(value, str):
        return TRACEPARENT.sub(r"\1-<trace-id>-<span-id>-\2", value)
    return value


def _scrub(value: Any, replace: dict[str, str]) -> Any:
    if isinstance(value, str):
        for old, new in replace.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, bytes):
        return _scrub(value.decode("utf-8"), replace).encode() if _is_utf8(value) else value
    if isinstance(value, dict):
        return {_scrub(k, replace): _scrub(v, replace) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, replace) for v in value]
    return value


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    """JSON keeps str, int, float, bool, null, list and map apart; the other AMQP types are tagged."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime.datetime):
        return {"$timestamp": value.isoformat()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
