"""topology.names and topology.spec: namespaced names, capability rules, hashable specs, built topology."""

from __future__ import annotations

import pytest

from fabric.topology import names, spec

NS = "acme"


def _all_names(ns: str) -> dict[str, str]:
    return {
        "submit_exchange": names.submit_exchange(ns),
        "submit_queue": names.submit_queue(ns),
        "tasks_exchange": names.tasks_exchange(ns),
        "capability_queue": names.capability_queue(ns, "http.fetch"),
        "retry_exchange": names.retry_exchange(ns),
        **{f"delay_queue_{tier}": names.delay_queue(ns, tier) for tier in names.DELAY_TIERS_MS},
        "events_exchange": names.events_exchange(ns),
        "events_queue": names.events_queue(ns),
        "notify_exchange": names.notify_exchange(ns),
        "dead_exchange": names.dead_exchange(ns),
        "dead_queue": names.dead_queue(ns),
        "alerts_exchange": names.alerts_exchange(ns),
        "heartbeats_exchange": names.heartbeats_exchange(ns),
        "heartbeats_queue": names.heartbeats_queue(ns),
        "control_exchange": names.control_exchange(ns),
        "rpc_exchange": names.rpc_exchange(ns),
        "rpc_queue": names.rpc_queue(ns),
    }


@pytest.mark.parametrize("ns", ["acme", "t-0123456789ab", "x"])
def test_every_name_starts_with_the_namespace(ns: str) -> None:
    for function, name in _all_names(ns).items():
        assert name.startswith(f"{ns}."), function


def test_names_of_the_wire_contract() -> None:
    built = _all_names(NS)

    assert built["submit_exchange"] == "acme.submit"
    assert built["submit_queue"] == "acme.router.submit"
    assert built["tasks_exchange"] == "acme.tasks"
    assert built["capability_queue"] == "acme.cap.http.fetch"
    assert built["retry_exchange"] == "acme.retry"
    assert built["delay_queue_30s"] == "acme.delay.30s"
    assert built["events_exchange"] == "acme.events"
    assert built["events_queue"] == "acme.router.events"
    assert built["notify_exchange"] == "acme.notify"
    assert built["dead_exchange"] == built["dead_queue"] == "acme.dead"
    assert built["alerts_exchange"] == "acme.alerts"
    assert built["heartbeats_exchange"] == "acme.heartbeats"
    assert built["control_exchange"] == "acme.control"
    assert built["rpc_exchange"] == "acme.rpc"
    assert names.event_routing_key("succeeded") == "task.succeeded"
    assert names.workflow_notify_key("wf-1", "failed") == "workflow.wf-1.failed"
    assert names.task_notify_key("wf-1", "a", "running") == "task.wf-1.a.running"


@pytest.mark.parametrize(
    "capability",
    [
        "Upper",
        "has space",
        "",
        "a" * 65,
        ".leading",
        "-leading",
        "_leading",
        "tab\t",
        "slash/x",
        "ümlaut",
        "newline\n",
    ],
    ids=[
        "upper",
        "space",
        "empty",
        "65-chars",
        "leading-dot",
        "leading-dash",
        "leading-underscore",
        "tab",
        "slash",
        "unicode",
        "trailing-newline",
    ],
)
def test_bad_capability_is_rejected(capability: str) -> None:
    with pytest.raises(ValueError, match="invalid capability"):
        names.check_capability(capability)
    with pytest.raises(ValueError, match="invalid capability"):
        names.capability_queue(NS, capability)


@pytest.mark.parametrize("capability", ["a", "0", "http.fetch", "llm_summarize-v2", "a" * 64])
def test_good_capability_is_accepted(capability: str) -> None:
    assert names.check_capability(capability) == capability
    assert names.capability_queue(NS, capability) == f"{NS}.cap.{capability}"


def test_unknown_delay_tier_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown delay tier"):
        names.delay_queue(NS, "3s")


def test_specs_are_hashable_and_equal_by_value() -> None:
    first = spec.build(NS, ["a", "b"])
    second = spec.build(NS, ["a", "b"])

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    assert len({*first.exchanges, *first.queues, *first.bindings}) == (
        len(first.exchanges) + len(first.queues) + len(first.bindings)
    )
    assert spec.build(NS, ["a"]) != first


def test_every_built_name_is_in_the_namespace() -> None:
    topology = spec.build(NS, ["a", "b.c"])

    used = [e.name for e in topology.exchanges] + [q.name for q in topology.queues]
    used += [b.queue for b in topology.bindings] + [b.exchange for b in topology.bindings]
    assert all(name.startswith(f"{NS}.") for name in used)


def test_one_priority_queue_per_capability() -> None:
    caps = ["http.fetch", "llm.summarize", "demo.echo"]

    topology = spec.build(NS, caps)

    cap_queues = {q.name: q for q in topology.queues if q.name.startswith(f"{NS}.cap.")}
    assert set(cap_queues) == {f"{NS}.cap.{cap}" for cap in caps}
    for queue in cap_queues.values():
        assert queue.arguments_dict == {"x-max-priority": 9}
    cap_bindings = {(b.queue, b.exchange, b.routing_key) for b in topology.bindings if b.queue in cap_queues}
    assert cap_bindings == {(f"{NS}.cap.{cap}", f"{NS}.tasks", cap) for cap in caps}


def test_delay_queues_dead_letter_to_tasks_keeping_the_routing_key() -> None:
    queues = {q.name: q.arguments_dict for q in spec.build(NS).queues}

    for tier, ttl_ms in names.DELAY_TIERS_MS.items():
        arguments = queues[f"{NS}.delay.{tier}"]
        assert arguments["x-message-ttl"] == ttl_ms
        assert arguments["x-dead-letter-exchange"] == f"{NS}.tasks"
        assert "x-dead-letter-routing-key" not in arguments


def test_delay_queues_are_bound_to_the_retry_headers_exchange() -> None:
    topology = spec.build(NS)

    exchanges = {e.name: e.type for e in topology.exchanges}
    assert exchanges[f"{NS}.retry"] is spec.ExchangeType.HEADERS
    for tier in names.DELAY_TIERS_MS:
        [binding] = [b for b in topology.bindings if b.queue == f"{NS}.delay.{tier}"]
        assert binding.exchange == f"{NS}.retry"
        assert dict(binding.arguments) == {"x-match": "all", "fabric-delay": tier}


def test_submit_and_events_queues_have_a_single_active_consumer() -> None:
    queues = {q.name: q.arguments_dict for q in spec.build(NS).queues}

    assert queues[f"{NS}.router.submit"] == {"x-single-active-consumer": True}
    assert queues[f"{NS}.router.events"] == {"x-single-active-consumer": True}


def test_exchange_types_of_the_wire_contract() -> None:
    exchanges = {e.name: e.type for e in spec.build(NS).exchanges}

    assert exchanges == {
        f"{NS}.submit": spec.ExchangeType.DIRECT,
        f"{NS}.tasks": spec.ExchangeType.DIRECT,
        f"{NS}.retry": spec.ExchangeType.HEADERS,
        f"{NS}.events": spec.ExchangeType.TOPIC,
        f"{NS}.notify": spec.ExchangeType.TOPIC,
        f"{NS}.dead": spec.ExchangeType.FANOUT,
        f"{NS}.alerts": spec.ExchangeType.TOPIC,
        f"{NS}.heartbeats": spec.ExchangeType.FANOUT,
        f"{NS}.control": spec.ExchangeType.FANOUT,
        f"{NS}.rpc": spec.ExchangeType.DIRECT,
    }


def test_add_dedups_and_keeps_order() -> None:
    core = spec.core(NS)
    a = spec.capability(NS, "a")
    b = spec.capability(NS, "b")

    combined = core + a + b + a + core

    assert combined == core + a + b
    assert combined + combined == combined
    assert [e.name for e in combined.exchanges].count(f"{NS}.tasks") == 1
    assert [q.name for q in combined.queues][-2:] == [f"{NS}.cap.a", f"{NS}.cap.b"]
    assert spec.build(NS, ["a", "a"]) == spec.build(NS, ["a"])
    assert spec.Topology() + core == core
