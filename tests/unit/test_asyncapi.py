"""`fabric docs asyncapi`: an AsyncAPI 3.0 document that covers the whole topology and every message
model, generated from the code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fabric.asyncapi import CAPABILITY_PLACEHOLDER, asyncapi_document, message_models
from fabric.cli import app
from fabric.topology import spec

NS = "acme"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi_document(NS)


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict), ref
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_the_structure_is_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "fabric"
    assert doc["info"]["version"]
    assert set(doc) >= {"channels", "operations", "components", "servers"}
    assert doc["servers"]["rabbitmq"]["protocol"] == "amqp"
    for channel_id, channel in doc["channels"].items():
        assert channel_id.replace("_", "").isalnum(), channel_id
        assert channel["messages"], channel_id
    for name, operation in doc["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        channel_ref = operation["channel"]["$ref"]
        # An operation's messages are messages of its own channel.
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (name, message)
    for name, message in doc["components"]["messages"].items():
        assert message["payload"]["$ref"].startswith("#/components/schemas/"), name
        assert message["contentType"] in ("application/json", "application/msgpack")


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    found = list(refs(doc))
    assert len(found) > 50
    for ref in found:
        resolve(doc, ref)


def test_every_exchange_and_queue_of_the_topology_is_a_channel(doc: dict[str, Any]) -> None:
    topology = spec.build(NS, ["http.fetch"])
    addresses = {c["address"] for c in doc["channels"].values()}
    # {ns}.dead is an exchange and a queue of the same name: a channel each.
    exchanges = {
        c["address"]: c["bindings"]["amqp"]["exchange"]
        for c in doc["channels"].values()
        if c.get("bindings", {}).get("amqp", {}).get("is") == "routingKey"
    }
    queues = {
        c["address"]
        for c in doc["channels"].values()
        if c.get("bindings", {}).get("amqp", {}).get("is") == "queue"
    }
    for exchange in topology.exchanges:
        assert exchanges[exchange.name]["type"] == str(exchange.type), exchange.name
    for queue in topology.queues:
        assert queue.name.replace(".cap.http.fetch", f".cap.{CAPABILITY_PLACEHOLDER}") in queues, queue.name
    expected = {e.name for e in topology.exchanges} | {
        q.name.replace(".cap.http.fetch", f".cap.{CAPABILITY_PLACEHOLDER}") for q in topology.queues
    }
    assert addresses - {None} == expected, "no channel the topology does not have"


def test_every_message_model_is_in_the_document(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    # Reachable from the messages: every model is a payload or part of one.
    reachable: set[str] = set()
    frontier = [m["payload"]["$ref"] for m in doc["components"]["messages"].values()]
    while frontier:
        ref = frontier.pop()
        name = ref.rsplit("/", 1)[1]
        if name in reachable:
            continue
        reachable.add(name)
        frontier.extend(refs(resolve(doc, ref)))
    for model in message_models():
        assert model.__name__ in schemas, model.__name__
        assert model.__name__ in reachable, (
            f"{model.__name__} travels on no channel: pair it in fabric/asyncapi.py"
        )
        # The schema is the model's own (generated, not written by hand).
        assert set(schemas[model.__name__].get("properties", {})) == set(model.model_fields), model.__name__


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_the_command_writes_valid_yaml_and_json(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRIC_NAMESPACE", NS)
    target = tmp_path / f"asyncapi.{suffix}"
    result = CliRunner().invoke(app, ["docs", "asyncapi", "--output", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text()
    loaded = json.loads(text) if suffix == "json" else yaml.safe_load(text)
    assert loaded == json.loads(json.dumps(asyncapi_document(NS)))


def test_the_command_prints_yaml_and_refuses_an_unknown_format() -> None:
    result = CliRunner().invoke(app, ["docs", "asyncapi"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["asyncapi"] == "3.0.0"
    refused = CliRunner().invoke(app, ["docs", "asyncapi", "--format", "xml"])
    assert refused.exit_code == 2
    assert "--format must be yaml or json" in refused.output
