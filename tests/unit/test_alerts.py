"""AlertPublisher without a broker: de-duplication, resolution, bounded queues, retries, shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabric.alerts import AlertPublisher
from fabric.errors import NotConnectedError
from fabric.protocol.messages import Alert, AlertSeverity, AlertStatus
from fabric.settings import AlertSettings

FAST = AlertSettings(webhook_retries=2, webhook_backoff_s=0.01)


class Broker:
    """A fake ``publish``: records (routing key, alert); can fail the first calls or block."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[str, Alert]] = []
        self.calls = 0
        self.fail_first = fail_first
        self.gate: asyncio.Event | None = None

    async def __call__(self, routing_key: str, body: bytes) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.calls <= self.fail_first:
            raise ConnectionError("broker away")
        self.sent.append((routing_key, Alert.model_validate_json(body)))


def fire(alerts: AlertPublisher, key: str = "disk:/var", **extra: Any) -> Alert | None:
    return alerts.fire(
        key, kind="disk.full", severity=AlertSeverity.WARNING, summary=f"{key} is full", **extra
    )


async def test_a_condition_fires_once_until_resolved_then_can_fire_again() -> None:
    broker = Broker()
    async with AlertPublisher(FAST, "ns1", broker, clock=lambda: 42.0) as alerts:
        first = fire(alerts, labels={"path": "/var"}, data={"free": 0})
        assert first is not None
        assert fire(alerts) is None, "firing again while firing does nothing"
        assert alerts.firing("disk:/var")
        resolved = alerts.resolve("disk:/var")
        assert resolved is not None
        assert alerts.resolve("disk:/var") is None, "resolving twice sends one resolved alert"
        assert not alerts.firing("disk:/var")
        again = fire(alerts)
        assert again is not None
        await alerts.flush(5)
    assert [(rk, a.status) for rk, a in broker.sent] == [
        ("alert.warning.disk.full", AlertStatus.FIRING),
        ("alert.warning.disk.full", AlertStatus.RESOLVED),
        ("alert.warning.disk.full", AlertStatus.FIRING),
    ]
    fired, cleared, _ = (a for _, a in broker.sent)
    assert fired == first
    assert (fired.namespace, fired.at, fired.labels) == ("ns1", 42.0, {"source": "router", "path": "/var"})
    assert fired.data == {"free": 0}
    assert cleared.key == fired.key
    assert cleared.labels == fired.labels
    assert cleared.summary == "resolved: disk:/var is full"
    assert cleared.alert_id != fired.alert_id
    assert alerts.stats["fired"] == 2
    assert alerts.stats["resolved"] == 1
    assert alerts.stats["published"] == 3


async def test_a_full_queue_drops_without_waiting_and_the_condition_can_fire_later() -> None:
    broker = Broker()
    broker.gate = asyncio.Event()  # the broker hangs: nothing is delivered
    settings = AlertSettings(queue_size=2)
    async with AlertPublisher(settings, "ns1", broker) as alerts:
        assert fire(alerts, "a") is not None
        await asyncio.sleep(0)  # the delivery task takes "a" and blocks on the broker
        assert fire(alerts, "b") is not None
        assert fire(alerts, "c") is not None
        assert fire(alerts, "d") is None, "the queue holds two: d is dropped at once"
        assert alerts.stats["dropped"] == 1
        assert not alerts.firing("d"), "a dropped alert is not remembered, so it fires next time"
        broker.gate.set()
        await alerts.flush(5)
        assert fire(alerts, "d") is not None
        await alerts.flush(5)
    assert [a.key for _, a in broker.sent] == ["a", "b", "c", "d"]


async def test_a_failing_publish_is_retried_with_backoff_then_given_up() -> None:
    flaky = Broker(fail_first=2)
    async with AlertPublisher(FAST, "ns1", flaky) as alerts:
        fire(alerts)
        await alerts.flush(5)
    assert flaky.calls == 3
    assert len(flaky.sent) == 1
    assert alerts.stats["failed"] == 0

    down = Broker(fail_first=100)
    async with AlertPublisher(FAST, "ns1", down) as alerts:
        fire(alerts)
        await alerts.flush(5)
    assert down.calls == 3, "one try and webhook_retries more"
    assert alerts.stats["failed"] == 1


async def test_close_gives_queued_alerts_a_grace_period_then_counts_the_rest_dropped() -> None:
    broker = Broker()
    broker.gate = asyncio.Event()
    alerts = AlertPublisher(FAST, "ns1", broker)
    async with alerts:
        fire(alerts, "a")
        fire(alerts, "b")
        await alerts.close(grace_s=0.05)
    assert broker.sent == []
    assert alerts.stats["dropped"] == 1, "b never left the queue (a was being sent when it closed)"
    with pytest.raises(NotConnectedError):
        fire(alerts, "c")


async def test_alerts_fired_before_start_wait_for_it() -> None:
    broker = Broker()
    alerts = AlertPublisher(FAST, "ns1", broker)
    fire(alerts)
    async with alerts:
        await alerts.flush(5)
    assert len(broker.sent) == 1
    with pytest.raises(NotConnectedError):
        await alerts.__aenter__()


async def test_without_destinations_conditions_are_still_tracked() -> None:
    async with AlertPublisher(AlertSettings(), "ns1", None) as alerts:
        assert fire(alerts) is not None
        assert alerts.firing_keys == ["disk:/var"]
        assert alerts.resolve("disk:/var") is not None
        await alerts.flush(1)


def test_an_alert_kind_must_be_dotted_lower_case() -> None:
    with pytest.raises(ValueError, match="kind"):
        Alert(
            alert_id="x",
            key="k",
            kind="Disk Full",
            severity=AlertSeverity.INFO,
            namespace="ns",
            summary="s",
            at=0,
        )


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="webhooks"):
        AlertSettings(webhooks=["ftp://example.com/x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="line break"):
        AlertSettings(webhook_headers={"X-Token": "a\r\nInjected: 1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="header name"):
        AlertSettings(webhook_headers={"Bad Header": "x"})  # type: ignore[dict-item]
