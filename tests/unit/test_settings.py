"""load_settings: defaults, sources and their order, and errors that name the setting to fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from fabric.errors import ConfigError
from fabric.settings import FabricSettings, load_settings

PASSWORD = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every FABRIC_* variable of the calling shell removed, so each test sees only what it sets."""
    for name in list(os.environ):
        if name.upper().startswith("FABRIC_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _profile(env: pytest.MonkeyPatch, folder: Path, text: str, name: str = "test") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    env.setenv("FABRIC_PROFILE", name)
    env.setenv("FABRIC_CONFIG_DIR", str(folder))
    return path


def test_defaults() -> None:
    settings = load_settings()

    assert isinstance(settings, FabricSettings)
    assert settings.namespace == "fabric"
    assert settings.profile is None
    assert settings.store.url == "sqlite:///fabric.db"
    assert settings.store.sqlite_synchronous == "FULL"
    assert settings.worker.concurrency == 8
    assert settings.worker.agent_id == ""
    assert settings.router.max_body_bytes == 4 * 1024 * 1024
    assert settings.router.max_tasks == 10_000
    assert settings.router.default_max_attempts == 3
    assert settings.http.port == 8080
    assert settings.log_level == "INFO"
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"


def test_nested_environment_variables(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_STORE__URL", "memory://")
    env.setenv("FABRIC_WORKER__CONCURRENCY", "3")
    env.setenv("FABRIC_NAMESPACE", "acme")

    settings = load_settings()

    assert settings.store.url == "memory://"
    assert settings.worker.concurrency == 3
    assert settings.worker.drain_timeout_s == 30.0
    assert settings.namespace == "acme"


def test_lower_case_environment_variables_count(env: pytest.MonkeyPatch) -> None:
    env.setenv("fabric_worker__concurrency", "6")

    assert load_settings().worker.concurrency == 6


def test_keyword_arguments_beat_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_NAMESPACE", "from-env")
    env.setenv("FABRIC_WORKER__CONCURRENCY", "3")
    env.setenv("FABRIC_WORKER__DRAIN_TIMEOUT_S", "4")

    settings = load_settings(namespace="from-init", worker={"concurrency": 5})

    assert settings.namespace == "from-init"
    assert settings.worker.concurrency == 5
    # Sections merge key by key: the env value of a key the kwargs do not give survives.
    assert settings.worker.drain_timeout_s == 4.0


def test_profile_is_below_environment_variables(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _profile(
        env,
        tmp_path,
        "log_level: DEBUG\nnamespace: from-profile\nworker:\n  concurrency: 4\n  drain_timeout_s: 7\n",
    )
    env.setenv("FABRIC_WORKER__CONCURRENCY", "2")

    settings = load_settings()

    assert settings.profile == "test"
    assert settings.log_level == "DEBUG"
    assert settings.namespace == "from-profile"
    assert settings.worker.concurrency == 2
    assert settings.worker.drain_timeout_s == 7.0
    assert load_settings(namespace="kw").namespace == "kw"


def test_empty_profile_file_means_defaults(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _profile(env, tmp_path, "# nothing set\n")

    assert load_settings().worker.concurrency == 8


def test_missing_profile_file_names_the_path(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("FABRIC_PROFILE", "nope")
    env.setenv("FABRIC_CONFIG_DIR", str(tmp_path))

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert str(tmp_path / "nope.yaml") in str(info.value)
    assert "FABRIC_CONFIG_DIR" in str(info.value)


def test_invalid_yaml_profile(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _profile(env, tmp_path, "worker: [unclosed\n")

    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_settings()

    assert str(path) in str(info.value)


def test_profile_that_is_not_a_mapping(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _profile(env, tmp_path, "- a\n- b\n")

    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings()


def test_unknown_key_in_profile_is_named(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _profile(env, tmp_path, "worker:\n  concurency: 4\n")

    with pytest.raises(ConfigError, match="FABRIC_WORKER__CONCURENCY"):
        load_settings()


def test_bad_value_names_the_environment_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_WORKER__CONCURRENCY", "lots")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert isinstance(info.value, ValueError)
    assert "FABRIC_WORKER__CONCURRENCY" in str(info.value)
    assert "'lots'" in str(info.value)


def test_out_of_range_value_names_the_environment_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_WORKER__CONCURRENCY", "0")

    with pytest.raises(ConfigError, match="FABRIC_WORKER__CONCURRENCY"):
        load_settings()


def test_unknown_environment_variable_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_NAMESPCE", "typo")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert "FABRIC_NAMESPCE" in str(info.value)
    assert "FABRIC_NAMESPACE" in str(info.value)


def test_unknown_nested_environment_variable_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_WORKR__CONCURRENCY", "2")

    with pytest.raises(ConfigError, match="FABRIC_WORKR__CONCURRENCY"):
        load_settings()


def test_amqp_url_is_secret(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_AMQP_URL", f"amqp://user:{PASSWORD}@broker:5672/vhost")

    settings = load_settings()

    assert isinstance(settings.amqp_url, SecretStr)
    assert settings.amqp_url.get_secret_value() == f"amqp://user:{PASSWORD}@broker:5672/vhost"
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in settings.model_dump_json()


def test_password_never_appears_in_config_errors(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_AMQP_URL", f"amqp://user:{PASSWORD}@broker:5672/")
    env.setenv("FABRIC_WORKER__CONCURRENCY", "lots")

    with pytest.raises(ConfigError) as env_error:
        load_settings(namespace="Not Valid")
    with pytest.raises(ConfigError) as type_error:
        load_settings(amqp_url=[f"amqp://user:{PASSWORD}@broker:5672/"])

    assert PASSWORD not in str(env_error.value)
    assert "FABRIC_NAMESPACE" in str(env_error.value)
    assert "FABRIC_WORKER__CONCURRENCY" in str(env_error.value)
    assert PASSWORD not in str(type_error.value)
    assert "FABRIC_AMQP_URL" in str(type_error.value)


@pytest.mark.parametrize(
    "namespace",
    ["", "Upper", "has space", "dot.ted", "-lead", "a" * 65, "ns\n"],
    ids=["empty", "upper", "space", "dot", "leading-dash", "65-chars", "trailing-newline"],
)
def test_invalid_namespace(namespace: str) -> None:
    with pytest.raises(ConfigError, match="FABRIC_NAMESPACE"):
        load_settings(namespace=namespace)


@pytest.mark.parametrize("namespace", ["a", "t-1", "x_y", "a" * 64])
def test_valid_namespace(namespace: str) -> None:
    assert load_settings(namespace=namespace).namespace == namespace


def test_unknown_store_scheme_names_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("FABRIC_STORE__URL", "postgres://db/fabric")

    with pytest.raises(ConfigError, match="FABRIC_STORE__URL"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("FABRIC_WORKER__CONCURENCY", "did you mean FABRIC_WORKER__CONCURRENCY?"),
        ("FABRIC_NAMESPCE", "did you mean FABRIC_NAMESPACE?"),
        ("FABRIC_STORE__UTL", "did you mean FABRIC_STORE__URL?"),
        ("FABRIC_ALERTS__RULES__QUEUE_DEPT", "did you mean FABRIC_ALERTS__RULES__QUEUE_DEPTH"),
        ("FABRIC_WROKER__CONCURRENCY", "did you mean FABRIC_WORKER__CONCURRENCY"),
        ("FABRIC_XYZZY", "known settings here: FABRIC_ALERTS, FABRIC_AMQP_URL"),
    ],
)
def test_unknown_setting_suggests_the_closest_name(
    env: pytest.MonkeyPatch, variable: str, suggestion: str
) -> None:
    env.setenv(variable, "3")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert f"unknown setting {variable}" in str(caught.value)
    assert suggestion in str(caught.value)


@pytest.mark.parametrize(
    "variable",
    [
        "FABRIC_WORKER__CONCURRENCY",
        "FABRIC_AMQP_URL",
        "FABRIC_POLICY__CAPABILITIES",
        "FABRIC_PROFILE",
        "HOME",
    ],
)
def test_known_settings_are_not_flagged(variable: str) -> None:
    from fabric.settings import unknown_setting

    assert unknown_setting(variable) is None


@pytest.mark.parametrize(
    "url", ["http://guest:guest@127.0.0.1:5672/", "https://broker.example/", "redis://127.0.0.1:6379/0", "x"]
)
def test_amqp_url_must_be_amqp(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("FABRIC_AMQP_URL", url)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert "FABRIC_AMQP_URL" in str(caught.value)
    assert "must be an AMQP URL" in str(caught.value)
    assert "guest:guest" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:5672/", "amqps://u:p@broker:5671/vh", "AMQP://h/"]
)
def test_amqp_urls_are_accepted(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("FABRIC_AMQP_URL", url)

    assert load_settings().amqp_url.get_secret_value() == url


@pytest.mark.parametrize(
    ("variables", "router_port", "worker_port"),
    [
        ({}, 8080, 8081),
        ({"FABRIC_HTTP__HOST": "0.0.0.0"}, 8080, 8081),
        ({"FABRIC_HTTP__PORT": "8080"}, 8080, 8080),
        ({"FABRIC_HTTP__PORT": "9000"}, 9000, 9000),
        ({"FABRIC_HTTP__PORT": "0"}, 0, 0),
    ],
)
def test_a_worker_keeps_off_the_routers_default_port(
    env: pytest.MonkeyPatch, variables: dict[str, str], router_port: int, worker_port: int
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    http = load_settings().http
    assert (http.port, http.worker_port) == (router_port, worker_port)
