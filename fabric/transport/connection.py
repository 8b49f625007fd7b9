"""The AMQP connection: connecting (with a clear reason when it fails), writes coalesced per loop
iteration, and the state the publishing, consuming and admin parts share.

aiormq and aio-pika errors met while connecting are translated here into :mod:`fabric.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import aiormq.connection
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from fabric.errors import NotConnectedError, TransportError

log = logging.getLogger("fabric.transport")

#: Longest wait for the broker to answer a consumer cancel or a channel close.
CANCEL_TIMEOUT_S = 5.0
#: A server that does not send the AMQP greeting (``Connection.Start``) within this long after the
#: protocol header is not an AMQP broker: connecting fails then, instead of after the whole connect timeout.
GREETING_TIMEOUT_S = 3.0
#: A connect still not done after this long has the greeting checked on a connection of its own.
_PROBE_AFTER_S = 0.5


class AmqpLink:
    """The robust connection and its two publish channels (confirmed, and unconfirmed), shared by the
    parts of :class:`fabric.transport.amqp.AmqpConnection`; each part adds its own state in ``__init__``
    and its own clean-up in :meth:`_release`."""

    def __init__(self, url: str, *, name: str = "fabric", publish_timeout_s: float = 30.0) -> None:
        self._url = url
        self._name = name
        self._publish_timeout_s = publish_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        #: The channel of ``publish_unconfirmed`` (no publisher confirms).
        self._unconfirmed_channel: AbstractChannel | None = None
        self._closed = False
        #: Called (without arguments) when the connection is lost (not when it is closed on purpose)...
        self.on_lost: list[Callable[[], None]] = []
        #: ...and when it is back, with its channels, queues, bindings and consumers restored.
        self.on_restored: list[Callable[[], None]] = []

    @property
    def connected(self) -> bool:
        conn = self._connection
        return (
            conn is not None
            and not conn.is_closed
            and self._publish_channel is not None
            and not (self._publish_channel.is_closed)
        )

    async def connect(self, timeout_s: float = 15.0) -> None:
        """Open the connection and the publish channel.

        Raises:
            TransportError: the broker cannot be reached, refused the login or the virtual host, or the
                server at the URL is no AMQP broker (no greeting within :data:`GREETING_TIMEOUT_S`).
        """
        if self._connection is not None:
            raise NotConnectedError("this AmqpConnection is already connected; create a new one")
        try:
            self._connection = await connect_or_explain(self._url, self._name, timeout_s)
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._unconfirmed_channel = await self._connection.channel(publisher_confirms=False)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            raise TransportError(
                f"cannot connect to the broker at {safe_url(self._url)}: {connect_failure(exc, self._url)}"
            ) from exc
        self._connection.close_callbacks.add(self._lost)
        self._connection.reconnect_callbacks.add(self._restored)

    def _lost(self, *_: object) -> None:
        if not self._closed:
            for callback in self.on_lost:
                callback()

    def _restored(self, *_: object) -> None:
        if not self._closed:
            for callback in self.on_restored:
                callback()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._release()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _release(self) -> None:
        """What a part must do before the connection closes (overridden cooperatively)."""

    def _require(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        if self._connection is None or self._publish_channel is None or self._closed:
            raise NotConnectedError("AmqpConnection is not connected: use 'async with AmqpConnection(...)'")
        return self._connection, self._publish_channel

    async def _channel(self) -> AbstractChannel:
        """A new channel without publisher confirms, for one operation."""
        connection, _ = self._require()
        return await connection.channel(publisher_confirms=False)


class _CoalescingTransportFactory(aiormq.connection.TCPTransportFactory):
    """Plain TCP, with every frame written during one event loop iteration sent in one ``send``.

    aiormq writes each message (and each ack) to the socket as it comes, one system call apiece; under
    load that is a large share of a fabric process's time. Here a write is buffered and the buffer is
    handed to the transport once, at the end of the current iteration (at once past 256 KiB). Order is
    kept, and the buffer is flushed before any ``drain``, ``write_eof`` or ``close``, so a frame written
    just before closing still goes out.
    """

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await super().create(url, **kwargs)
        _coalesce_writes(writer)
        return reader, writer


#: A buffer of this many bytes is sent at once instead of at the end of the loop iteration.
_COALESCE_LIMIT = 256 * 1024


def _coalesce_writes(writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    transport = writer.transport
    pending: list[bytes] = []
    size = 0
    write, drain, write_eof, close = writer.write, writer.drain, writer.write_eof, writer.close

    def flush() -> None:
        nonlocal size
        if pending:
            data = b"".join(pending)
            pending.clear()
            size = 0
            if not transport.is_closing():
                write(data)

    def buffered_write(data: Any) -> None:
        nonlocal size
        if not pending:
            loop.call_soon(flush)
        pending.append(bytes(data))
        size += len(data)
        if size >= _COALESCE_LIMIT:
            flush()

    async def flushing_drain() -> None:
        flush()
        await drain()

    def flushing_write_eof() -> None:
        flush()
        write_eof()

    def flushing_close() -> None:
        flush()
        close()

    writer.write = buffered_write  # type: ignore[method-assign]
    writer.drain = flushing_drain  # type: ignore[method-assign]
    writer.write_eof = flushing_write_eof  # type: ignore[method-assign]
    writer.close = flushing_close  # type: ignore[method-assign]


class _RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, writing through :class:`_CoalescingTransportFactory` (plain amqp://;
    amqps:// keeps aiormq's TLS transport). The factory is used again on every reconnect."""

    def __init__(self, url: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        if self.url.scheme == "amqp" and COALESCE_WRITES:
            self.kwargs["transport_factory"] = _CoalescingTransportFactory()


#: Set to False to write every frame at once (for A/B measurements).
COALESCE_WRITES = True


class _NoTransportErrorLine(logging.Filter):
    """Drops aiormq's "error when creating transport" line: aiormq raises that error right after logging
    it, and fabric reports it once (a TransportError on connect; aio-pika's warning on a reconnect)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_NoTransportErrorLine())


async def connect_or_explain(url: str, name: str, timeout_s: float) -> AbstractRobustConnection:
    """``aio_pika.connect_robust``; when it is not done after ``_PROBE_AFTER_S``, the server is asked for
    its greeting on a connection of its own, and one that gives none within :data:`GREETING_TIMEOUT_S`
    fails the connect (a web server or Redis on the port would otherwise fail it after ``timeout_s``,
    with an empty reason)."""
    connection = _RobustConnection(
        aio_pika.connection.make_url(url), client_properties={"connection_name": name}
    )
    connecting = asyncio.ensure_future(connection.connect(timeout=timeout_s))
    try:
        done, _ = await asyncio.wait({connecting}, timeout=min(_PROBE_AFTER_S, timeout_s))
        if not done and urlsplit(url).scheme.lower() == "amqp" and await _greets_as_amqp(url) is False:
            raise TimeoutError(
                f"no AMQP greeting within {GREETING_TIMEOUT_S:g}s: this is not an AMQP server "
                "(check the host and port of FABRIC_AMQP_URL; RabbitMQ listens on 5672)"
            )
        await connecting
        return connection
    except BaseException:
        # A robust connection that never opened would keep trying in the background: stop it.
        connecting.cancel()
        with contextlib.suppress(Exception):
            await connection.close()
        with contextlib.suppress(BaseException):
            await connecting
        raise


async def _greets_as_amqp(url: str) -> bool | None:
    """Whether the server at ``url`` answers the AMQP protocol header with a method frame within
    :data:`GREETING_TIMEOUT_S`; None when it cannot be reached (the connect reports that)."""
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "localhost", parts.port or 5672), GREETING_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        first = await asyncio.wait_for(reader.read(1), GREETING_TIMEOUT_S)
        # An AMQP broker answers with Connection.Start: a method frame (type 1) on channel 0.
        return first == b"\x01"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def connect_failure(exc: BaseException, url: str) -> str:
    """What went wrong connecting, in words: aiormq says ``Expected one of ['Connection.OpenOk'], got
    <Connection.Close ...>`` when the broker refuses the virtual host."""
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.AMQPError) and "Connection.OpenOk" in text and "Close" in text:
        parts = urlsplit(url)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        user = unquote(parts.username or "guest")
        return (
            f"the broker refused virtual host {vhost!r} for user {user!r} (the vhost does not exist, or the "
            "user has no permission on it; the vhost is the path of FABRIC_AMQP_URL)"
        )
    return text or type(exc).__name__


def safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
