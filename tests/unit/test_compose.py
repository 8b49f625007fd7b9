"""The deployment files (Dockerfile, compose.yaml, configs/) agree with the code they deploy.

Nothing here needs Docker: the files are parsed and checked against the CLI, the settings model and the
demo agent, so a renamed command, setting or module breaks this test instead of ``docker compose up``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel, SecretStr

from fabric.settings import FabricSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CONFIGS = ROOT / "configs"
EXAMPLE_ENV = CONFIGS / "fabric.example.env"
RABBITMQ_CONF = CONFIGS / "rabbitmq.conf"
PROFILES = ("dev", "staging", "prod")
FABRIC_SERVICES = ("router", "worker")


# --- parsing helpers -------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    service = services[name]
    assert isinstance(service, dict)
    return service


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` in either compose form (mapping, or list of ``KEY=VALUE``)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _dockerfile_final_stage() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the last build stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _dockerfile_instruction(keyword: str) -> str:
    """Arguments of the last ``keyword`` instruction in the final stage (the one Docker uses)."""
    found = [args for kw, args in _dockerfile_final_stage() if kw == keyword]
    assert found, f"the Dockerfile's final stage has no {keyword}"
    return found[-1]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile_final_stage():
        if keyword != "ENV":
            continue
        tokens = shlex.split(args)
        if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY value with spaces
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _container_environment(service_name: str) -> dict[str, str]:
    """What a fabric container sees: the image's ENV overlaid by the compose service's environment."""
    return {**_dockerfile_env(), **_compose_environment(_service(service_name))}


def _published_ports(service: dict[str, Any]) -> list[tuple[str | None, int]]:
    """``(host port or None, container port)`` for each ``ports`` entry, short or long syntax."""
    result: list[tuple[str | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            result.append((None if published in (None, "") else str(published), int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]  # drop /tcp, /udp
        parts = spec.rsplit(":", 2)
        target = int(parts[-1].split("-", 1)[0])
        published = parts[-2] if len(parts) >= 2 and parts[-2] else None
        result.append((published, target))
    return result


# --- settings helpers ------------------------------------------------------------------------------------


def _setting_path(env_name: str) -> tuple[str, ...]:
    """``FABRIC_WORKER__CONCURRENCY`` -> ``("worker", "concurrency")``, failing unless the model has it.

    Needed because pydantic-settings silently ignores unknown top-level ``FABRIC_*`` variables (a typo
    such as ``FABRIC_NAMESPCE`` would otherwise pass unnoticed).
    """
    parts = tuple(part.lower() for part in env_name.removeprefix("FABRIC_").split("__"))
    model: type[BaseModel] = FabricSettings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            pytest.fail(f"{env_name}: {part!r} is not a field of {model.__name__}")
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1:
            if not is_section:
                pytest.fail(f"{env_name}: {part!r} is a plain setting, not a section")
            assert isinstance(annotation, type)
            model = annotation
        elif is_section:
            pytest.fail(f"{env_name}: names the whole section {part!r}; set its fields one by one")
    return parts


def _leaf_paths(
    model: type[BaseModel] = FabricSettings, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_paths(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def _env_name(path: tuple[str, ...]) -> str:
    return "FABRIC_" + "__".join(path).upper()


def _value_at(settings: FabricSettings, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _matches(value: Any, expected: Any) -> bool:
    """Whether a loaded setting equals a value written in an env file (a string) or a YAML profile."""
    if value is None:
        return expected in (None, "")
    if isinstance(value, Path):
        return value == Path(str(expected))
    if isinstance(value, bool):
        return str(expected).lower() == str(value).lower()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) == float(expected)
    return bool(value == expected) or str(value) == str(expected)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A monkeypatch with every ``FABRIC_*`` variable of the calling shell removed."""
    for name in list(os.environ):
        if name.upper().startswith("FABRIC_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _cli_commands() -> set[str]:
    from fabric.cli import app

    # A Typer app with several commands becomes a group; `commands` maps each name to its command.
    # (Duck-typed: recent Typer releases vendor click, so the group is not always a click.Group.)
    commands = getattr(typer.main.get_command(app), "commands", None)
    assert isinstance(commands, dict), "fabric.cli.app must have several commands"
    return set(commands)


# --- compose.yaml ----------------------------------------------------------------------------------------


def test_compose_defines_the_stack() -> None:
    services = _compose()["services"]

    assert {"rabbitmq", "redis", "jaeger", "router", "worker"} <= set(services)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.10-management")
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")


@pytest.mark.parametrize("service_name", FABRIC_SERVICES)
def test_service_command_is_a_cli_command(service_name: str) -> None:
    command = _command(_service(service_name))

    assert command[0] == service_name
    assert command[0] in _cli_commands()


def test_worker_command_names_an_importable_agent() -> None:
    command = _command(_service("worker"))
    assert len(command) == 2, f"expected ['worker', 'module:attribute'], got {command}"
    assert re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", command[1]), (
        f"{command[1]!r} is not module:attribute"
    )
    module_name, _, attribute = command[1].partition(":")

    agent = getattr(importlib.import_module(module_name), attribute)

    assert any(cls.__name__ == "Agent" for cls in type(agent).__mro__), f"{command[1]} is a {type(agent)}"


@pytest.mark.parametrize("service_name", FABRIC_SERVICES)
def test_fabric_variables_are_settings_and_take_effect(env: pytest.MonkeyPatch, service_name: str) -> None:
    container_env = _container_environment(service_name)
    fabric_vars = {name: value for name, value in container_env.items() if name.startswith("FABRIC_")}
    assert fabric_vars, f"{service_name} sets no FABRIC_* variable"
    paths = {name: _setting_path(name) for name in fabric_vars}
    # The image's /app/configs is this repository's configs/ folder.
    fabric_vars["FABRIC_CONFIG_DIR"] = str(CONFIGS)
    for name, value in fabric_vars.items():
        env.setenv(name, value)

    settings = load_settings()

    for name, path in paths.items():
        if name == "FABRIC_CONFIG_DIR":
            continue
        assert _matches(_value_at(settings, path), fabric_vars[name]), f"{name} did not reach the settings"


@pytest.mark.parametrize("service_name", FABRIC_SERVICES)
def test_healthcheck_hits_the_service_http_port(env: pytest.MonkeyPatch, service_name: str) -> None:
    for name, value in _container_environment(service_name).items():
        if name.startswith("FABRIC_"):
            env.setenv(name, value)
    env.setenv("FABRIC_CONFIG_DIR", str(CONFIGS))
    settings = load_settings()
    test = " ".join(str(part) for part in _service(service_name)["healthcheck"]["test"])

    assert settings.http.host == "0.0.0.0"
    assert f"http://127.0.0.1:{settings.http.port}/healthz" in test


def test_router_port_mapping_matches_http_port(env: pytest.MonkeyPatch) -> None:
    router = _service("router")
    for name, value in _container_environment("router").items():
        if name.startswith("FABRIC_"):
            env.setenv(name, value)
    env.setenv("FABRIC_CONFIG_DIR", str(CONFIGS))
    port = load_settings().http.port

    assert (str(port), port) in _published_ports(router)


def test_worker_publishes_no_fixed_host_port() -> None:
    worker = _service("worker")

    fixed = [(host, target) for host, target in _published_ports(worker) if host is not None]
    assert not fixed, f"worker publishes host ports {fixed}: `--scale worker=N` would collide"
    assert "container_name" not in worker, "a fixed container_name prevents scaling"


def test_rabbitmq_loads_the_fabric_config() -> None:
    rabbitmq = _service("rabbitmq")
    mounts = [str(volume) for volume in rabbitmq.get("volumes") or []]

    assert any(m.startswith("./configs/rabbitmq.conf:/etc/rabbitmq/") for m in mounts), mounts
    assert "rabbitmq-diagnostics" in " ".join(rabbitmq["healthcheck"]["test"])


# --- Dockerfile ------------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

    assert json.loads(_dockerfile_instruction("ENTRYPOINT")) == ["fabric"]
    assert scripts["fabric"] == "fabric.cli:main"


def test_dockerfile_default_command_is_the_router() -> None:
    command = json.loads(_dockerfile_instruction("CMD"))

    assert command == ["router"]
    assert command[0] in _cli_commands()


def test_dockerfile_runs_as_non_root_and_listens_on_all_interfaces() -> None:
    user = _dockerfile_instruction("USER").split(":", 1)[0]
    image_env = _dockerfile_env()

    assert user not in ("root", "0")
    assert image_env["FABRIC_HTTP__HOST"] == "0.0.0.0"
    config_dir = image_env.get("FABRIC_CONFIG_DIR", "configs").rstrip("/")
    copies = [args.split() for kw, args in _dockerfile_final_stage() if kw == "COPY"]
    assert any(parts[-1].rstrip("/") == config_dir and "configs" in parts[-2] for parts in copies), (
        f"the image must copy configs/ to {config_dir}"
    )


# --- configs/ --------------------------------------------------------------------------------------------


def test_profiles_are_dev_staging_prod() -> None:
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(PROFILES)


def _leaves(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_and_applies(env: pytest.MonkeyPatch, profile: str) -> None:
    env.setenv("FABRIC_PROFILE", profile)
    env.setenv("FABRIC_CONFIG_DIR", str(CONFIGS))
    data = yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())
    assert isinstance(data, dict)
    # The profile is chosen by the environment; these keys inside a profile file would mean nothing.
    assert not {"profile", "config_dir"} & set(data)

    settings = load_settings()

    assert settings.profile == profile
    for path, value in _leaves(data):
        assert _matches(_value_at(settings, path), value), f"{profile}.yaml: {'.'.join(path)} not applied"


def _example_env() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        match = re.match(r"^#?\s*(FABRIC_[A-Z0-9_]+)=(.*)$", line)
        if match:
            name, value = match.groups()
            assert name not in entries, f"{name} is listed twice"
            entries[name] = value.strip()
    return entries


def test_example_env_lists_every_setting_with_its_default(env: pytest.MonkeyPatch) -> None:
    entries = _example_env()
    defaults = load_settings()

    assert set(entries) == {_env_name(path) for path in _leaf_paths()}
    for name, value in entries.items():
        path = _setting_path(name)
        assert _matches(_value_at(defaults, path), value), f"{name}={value} is not the default"


def test_rabbitmq_consumer_timeout_exceeds_every_task_timeout(env: pytest.MonkeyPatch) -> None:
    conf = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=") for line in RABBITMQ_CONF.read_text().splitlines() if "=" in line
        )
        if not key.lstrip().startswith("#")
    )
    consumer_timeout_ms = int(conf["consumer_timeout"])
    env.setenv("FABRIC_CONFIG_DIR", str(CONFIGS))
    timeouts = [load_settings().worker.default_timeout_s]
    for profile in PROFILES:
        env.setenv("FABRIC_PROFILE", profile)
        timeouts.append(load_settings().worker.default_timeout_s)

    assert consumer_timeout_ms == 1_800_000
    assert max(timeouts) * 1000 < consumer_timeout_ms
    assert "vm_memory_high_watermark.relative" in conf
    assert "disk_free_limit.absolute" in conf
