"""Alerts: one condition fires once, is delivered in the background, and is resolved once.

:class:`AlertPublisher` is what every alerting part of fabric uses (escalated tasks, threshold rules, the
agent watchdog). Each alert goes to the topic exchange ``{ns}.alerts`` (routing key
``alert.<severity>.<kind>``, JSON body, persistent) and is POSTed as JSON to every configured webhook.

Delivery never blocks or slows the caller: :meth:`AlertPublisher.fire` and
:meth:`AlertPublisher.resolve` are plain (non-async) calls that put the alert on a bounded queue per
destination (the broker, each webhook); one background task per destination delivers its queue in
order, so a hanging webhook delays only its own later alerts. When a queue is full the alert is dropped
for that destination with a logged warning and counted (``dropped``), never waited for. A webhook that
fails (connection refused, a 5xx, 408 or 429, no answer within ``webhook_timeout_s``) is tried again
``webhook_retries`` times with exponential backoff; any other 4xx is not retried. A broker publish that
fails is retried the same way. Every failure is logged; none reaches the caller.

Webhooks are POSTed with httpx, one client (and its kept-alive connections) for the publisher's life.
https is verified against the system's trust store as Python's :mod:`ssl` finds it (``SSL_CERT_FILE``,
``SSL_CERT_DIR``); redirects are not followed (a 3xx is a failure, not retried); no proxy is taken from
the environment; a user and password in the URL are sent as Basic auth.

De-duplication: an alert has a ``key`` naming its condition (``task.escalated:<wf>/<task>``,
``queue.depth:<queue>``...). While a key is firing, firing it again does nothing; :meth:`resolve` clears
it and sends one ``resolved`` alert with the same key, kind, severity and labels. The firing set lives in
the process: after a restart a condition still true fires again (once).

Example:
    >>> async with AlertPublisher(settings.alerts, "fabric", publish) as alerts:
    ...     alerts.fire("disk:/var", kind="disk.full", severity=AlertSeverity.WARNING, summary="disk full")
    ...     alerts.resolve("disk:/var")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from fabric.errors import NotConnectedError
from fabric.protocol.messages import Alert, AlertSeverity, AlertStatus
from fabric.settings import AlertSettings
from fabric.topology import names

log = logging.getLogger("fabric.alerts")

#: Publishes one alert body to ``{ns}.alerts``: ``(routing_key, json_body)``; raises on failure.
PublishAlert = Callable[[str, bytes], Awaitable[None]]

#: Conditions remembered as firing at most (the oldest is forgotten first: it would fire again).
MAX_FIRING = 100_000
#: On close, how long alerts still queued may take to go out before they are given up.
CLOSE_GRACE_S = 2.0
#: HTTP statuses worth another try: the receiver is overloaded or timed out, not refusing the alert.
_RETRYABLE_4XX = frozenset({408, 425, 429})
#: Bytes of a webhook's answer read at most after its status (only the status counts; reading a short
#: body to its end lets the connection be used again, and the bound keeps a long one from costing more).
_MAX_ANSWER = 64 * 1024
#: ... and how long that reading may take (a webhook that answers, then dribbles, delays no one).
_MAX_ANSWER_S = 1.0


class WebhookError(Exception):
    """A webhook POST that did not succeed (kept inside this module; logged, never raised to callers)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(eq=False)
class _Destination:
    """One place alerts go, with its own queue and delivery task."""

    name: str
    send: Callable[[Alert, bytes], Awaitable[None]]
    queue: asyncio.Queue[Alert]
    task: asyncio.Task[None] | None = field(default=None)


class AlertPublisher:
    """Fires, de-duplicates and resolves alerts; delivers them in the background.

    Use as ``async with AlertPublisher(...) as alerts:``; :meth:`fire` and :meth:`resolve` may be called
    before it is entered (alerts wait on the queue) but not after it is closed.

    Args:
        settings: webhooks, timeouts, retries and the queue bound.
        namespace: the fabric namespace (in every alert).
        publish: sends ``(routing_key, body)`` to ``{ns}.alerts`` (confirmed); None to skip the broker.
        source: who raises the alerts (a label of every alert, e.g. ``router``).
        publish_timeout_s: how long one broker publish may take.
        clock: seconds since the epoch, injected for tests.
    """

    def __init__(
        self,
        settings: AlertSettings,
        namespace: str,
        publish: PublishAlert | None,
        *,
        source: str = "router",
        publish_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.namespace = namespace
        self._publish = publish
        self._source = source
        self._publish_timeout_s = publish_timeout_s
        self._clock = clock
        self._destinations: list[_Destination] = []
        if publish is not None:
            self._destinations.append(_Destination("{ns}.alerts", self._to_broker, self._new_queue()))
        for url in settings.webhooks:
            send = functools.partial(self._post, str(url))
            self._destinations.append(_Destination(_redact(str(url)), send, self._new_queue()))
        self._firing: OrderedDict[str, Alert] = OrderedDict()
        self._started = False
        self._closed = False
        self._webhook_headers = {
            "Content-Type": "application/json",
            "User-Agent": "fabric-alerts",
            **{k: v.get_secret_value() for k, v in settings.webhook_headers.items()},
        }
        self._http: httpx.AsyncClient | None = None
        #: What happened since start: fired, resolved, published (broker), delivered (webhook POSTs that
        #: succeeded), failed (deliveries given up after their retries), dropped (queue full).
        self.stats: dict[str, int] = {
            "fired": 0,
            "resolved": 0,
            "published": 0,
            "delivered": 0,
            "failed": 0,
            "dropped": 0,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    def _new_queue(self) -> asyncio.Queue[Alert]:
        return asyncio.Queue(maxsize=self.settings.queue_size)

    async def __aenter__(self) -> Self:
        if self._started or self._closed:
            raise NotConnectedError("an AlertPublisher cannot be started twice; create a new one")
        self._started = True
        if self.settings.webhooks:
            self._http = webhook_client(self.settings.webhook_timeout_s)
        for destination in self._destinations:
            destination.task = asyncio.create_task(
                self._deliver_forever(destination), name=f"fabric-alerts {destination.name}"
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Give queued alerts ``grace_s`` to go out, then stop (what is left is logged as dropped)."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        with contextlib.suppress(TimeoutError):
            await self.flush(grace_s)
        for destination in self._destinations:
            if destination.task is not None:
                destination.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await destination.task
            left = destination.queue.qsize()
            if left:
                self.stats["dropped"] += left
                log.warning("%d alert(s) not delivered to %s before shutdown", left, destination.name)
        if self._http is not None:
            await self._http.aclose()

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every alert queued so far has been delivered or given up (for tests and shutdown).

        Raises:
            TimeoutError: not done within ``timeout_s``.
        """
        await asyncio.wait_for(asyncio.gather(*(d.queue.join() for d in self._destinations)), timeout_s)

    # -- conditions -------------------------------------------------------------------------------

    def firing(self, key: str) -> bool:
        """True while the condition ``key`` has fired and not been resolved."""
        return key in self._firing

    @property
    def firing_keys(self) -> list[str]:
        return list(self._firing)

    @property
    def firing_alerts(self) -> list[Alert]:
        """The ``firing`` alert of each condition that holds now, oldest first."""
        return list(self._firing.values())

    def fire(
        self,
        key: str,
        *,
        kind: str,
        severity: AlertSeverity,
        summary: str,
        detail: str = "",
        labels: Mapping[str, str] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Alert | None:
        """Raise the condition ``key``: queue a ``firing`` alert unless it is firing already.

        Returns:
            The alert queued; None when the condition was firing already, or the queue was full
            (then it is not remembered as firing, so the next check fires it again).
        """
        if key in self._firing:
            return None
        alert = Alert(
            alert_id=uuid.uuid4().hex,
            key=key,
            kind=kind,
            severity=severity,
            status=AlertStatus.FIRING,
            namespace=self.namespace,
            summary=summary,
            detail=detail,
            labels={"source": self._source, **(labels or {})},
            data=dict(data or {}),
            at=self._clock(),
        )
        if not self._enqueue(alert):
            return None
        self._firing[key] = alert
        while len(self._firing) > MAX_FIRING:
            self._firing.popitem(last=False)
        self.stats["fired"] += 1
        log.warning("alert %s %s: %s", severity, key, summary)
        return alert

    def resolve(self, key: str, *, summary: str | None = None, detail: str = "") -> Alert | None:
        """Clear the condition ``key``: queue one ``resolved`` alert if it was firing.

        Returns:
            The alert queued; None when the condition was not firing (or the queue was full; it is
            cleared all the same).
        """
        fired = self._firing.pop(key, None)
        if fired is None:
            return None
        alert = fired.model_copy(
            update={
                "alert_id": uuid.uuid4().hex,
                "status": AlertStatus.RESOLVED,
                "summary": summary or f"resolved: {fired.summary}",
                "detail": detail,
                "at": self._clock(),
            }
        )
        if not self._enqueue(alert):
            return None
        self.stats["resolved"] += 1
        log.info("alert resolved %s", key)
        return alert

    def _enqueue(self, alert: Alert) -> bool:
        """Queue ``alert`` for every destination; False when every destination's queue was full."""
        if self._closed:
            raise NotConnectedError("the AlertPublisher is closed")
        accepted = not self._destinations
        for destination in self._destinations:
            try:
                destination.queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.stats["dropped"] += 1
                log.warning(
                    "alert queue of %s full (%d waiting; is it slow?): dropped %s alert %s",
                    destination.name,
                    destination.queue.qsize(),
                    alert.status,
                    alert.key,
                )
            else:
                accepted = True
        return accepted

    # -- delivery ---------------------------------------------------------------------------------

    async def _deliver_forever(self, destination: _Destination) -> None:
        while True:
            alert = await destination.queue.get()
            try:
                await destination.send(alert, alert.model_dump_json().encode())
            except Exception:
                log.exception("delivering alert %s to %s failed", alert.key, destination.name)
            finally:
                destination.queue.task_done()

    async def _to_broker(self, alert: Alert, body: bytes) -> None:
        assert self._publish is not None
        routing_key = names.alert_routing_key(str(alert.severity), alert.kind)
        for attempt in range(self.settings.webhook_retries + 1):
            try:
                async with asyncio.timeout(self._publish_timeout_s):
                    await self._publish(routing_key, body)
            except Exception as exc:
                log.warning(
                    "alert %s not published to the broker (attempt %d): %s", alert.key, attempt + 1, exc
                )
                await self._backoff(attempt)
                continue
            self.stats["published"] += 1
            return
        self.stats["failed"] += 1
        log.error("alert %s %s could not be published to the broker; giving up", alert.status, alert.key)

    async def _post(self, url: str, alert: Alert, body: bytes) -> None:
        assert self._http is not None
        shown = _redact(url)
        timeout_s = self.settings.webhook_timeout_s
        for attempt in range(self.settings.webhook_retries + 1):
            try:
                await http_post(self._http, url, body, self._webhook_headers, timeout_s=timeout_s)
            except (TimeoutError, httpx.TimeoutException):
                reason, retryable = f"no answer within {timeout_s:g}s", True
            except WebhookError as exc:
                reason, retryable = str(exc), exc.retryable
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                reason, retryable = f"{type(exc).__name__}: {exc}", False
            except (httpx.HTTPError, OSError, ValueError) as exc:
                reason, retryable = f"{type(exc).__name__}: {exc}", True
            else:
                self.stats["delivered"] += 1
                return
            if not retryable:
                break
            log.warning(
                "webhook %s failed for alert %s (attempt %d): %s", shown, alert.key, attempt + 1, reason
            )
            if attempt < self.settings.webhook_retries:
                await self._backoff(attempt)
        self.stats["failed"] += 1
        log.error("webhook %s: giving up on %s alert %s: %s", shown, alert.status, alert.key, reason)

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.settings.webhook_backoff_s * (2**attempt))


def webhook_client(timeout_s: float) -> httpx.AsyncClient:
    """The HTTP client of a publisher's webhooks (see the module docstring for its policy)."""
    return httpx.AsyncClient(
        # Python's default context, not certifi's bundle: the trust store the operator configured.
        verify=ssl.create_default_context(),
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        # No proxy or .netrc from the environment: a webhook goes where its URL says, as it always has.
        trust_env=False,
    )


def status_failure(status: int) -> WebhookError | None:
    """None for a 2xx answer; else why it failed, ``retryable`` for 5xx, 408, 425 and 429 (pure).

    Example:
        >>> status_failure(204) is None, status_failure(503).retryable, status_failure(307).retryable
        (True, True, False)
    """
    if 200 <= status < 300:
        return None
    return WebhookError(f"HTTP {status}", retryable=status >= 500 or status in _RETRYABLE_4XX)


async def http_post(
    client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float
) -> int:
    """POST ``body`` to ``url`` with ``client``; the status code of a 2xx answer.

    The status must come within ``timeout_s`` (connect, send, status line). The answer's body is then
    read (at most :data:`_MAX_ANSWER` bytes in :data:`_MAX_ANSWER_S`) only so the connection can be used
    again; a failure there does not change the outcome.

    Raises:
        WebhookError: the answer was not 2xx (see :func:`status_failure`).
        TimeoutError: no status within ``timeout_s``.
        httpx.HTTPError: the connection failed (the URL's user and password go as Basic auth).
    """
    request = client.build_request("POST", url, content=body, headers=headers)
    async with asyncio.timeout(timeout_s):
        response = await client.send(request, stream=True)
    try:
        with contextlib.suppress(httpx.HTTPError, TimeoutError):
            async with asyncio.timeout(min(timeout_s, _MAX_ANSWER_S)):
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > _MAX_ANSWER:
                        break
    finally:
        await response.aclose()
    failure = status_failure(response.status_code)
    if failure is not None:
        raise failure
    return response.status_code


def _redact(url: str) -> str:
    """The URL without credentials or query (which may hold tokens), for logs."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"
