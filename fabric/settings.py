"""One settings tree, built once in the entry point and passed down.

Sources, highest priority first: keyword arguments, ``FABRIC_*`` environment variables (nested with
``__``, e.g. ``FABRIC_STORE__URL``), the profile file ``configs/<FABRIC_PROFILE>.yaml``, defaults.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fabric.errors import ConfigError
from fabric.protocol.messages import CAPABILITY_PATTERN, OnExhausted

#: Namespace used when FABRIC_NAMESPACE is not set.
DEFAULT_NAMESPACE = "fabric"
_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreSettings(_Section):
    #: ``sqlite:///path/to/file.db``, ``redis://host:port/db`` or ``memory://``.
    url: str = "sqlite:///fabric.db"
    #: SQLite ``synchronous`` level: FULL makes every commit durable across power loss.
    sqlite_synchronous: str = Field(default="FULL", pattern="^(OFF|NORMAL|FULL|EXTRA)$")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "redis://", "rediss://", "memory://")):
            raise ValueError("must start with sqlite:///, redis://, rediss:// or memory://")
        return value


class RouterSettings(_Section):
    #: Largest submission body accepted, in bytes (larger ones are rejected as ``too_large``).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: Most tasks in one workflow.
    max_tasks: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Unacked submissions the router holds at once.
    submit_prefetch: int = Field(default=16, ge=1, le=1000)
    #: Unacked events the router holds at once.
    events_prefetch: int = Field(default=256, ge=1, le=10_000)
    #: Default attempts per task when the submission gives none.
    default_max_attempts: int = Field(default=3, ge=1, le=100)
    #: How long a publish may wait for the broker's confirm.
    publish_timeout_s: float = Field(default=30.0, gt=0)
    #: While active, how often the router republishes ready tasks and announces finished workflows
    #: whose publish failed earlier (a broker hiccup must not strand a workflow until a restart).
    recovery_interval_s: float = Field(default=15.0, gt=0)
    #: How often the router reads queue depths from the broker (passive declares) and counts live
    #: agents for ``/metrics``.
    metrics_interval_s: float = Field(default=5.0, gt=0)
    #: How often the router looks for long tasks whose lease lapsed (their worker stopped renewing it).
    lease_check_interval_s: float = Field(default=5.0, gt=0)
    #: While active, how often the router stores a sample of the dashboard's trend charts (throughput,
    #: errors, queue depths, agents); samples older than ``history_s`` are dropped.
    sample_interval_s: float = Field(default=10.0, ge=1.0)
    #: How far back the stored samples reach (the dashboard's trend charts show the last hour).
    history_s: float = Field(default=3600.0, ge=60.0, le=7 * 24 * 3600.0)
    #: Stall watchdog: a live agent with a free slot and its breaker closed that got no task of a
    #: capability for this long, while that capability's queue had tasks ready all along, is marked
    #: ``unhealthy`` and an alert goes to ``{ns}.alerts``.
    stall_after_s: float = Field(default=60.0, gt=0)
    #: How often the active router runs the stall watchdog (checks the queues of idle agents).
    stall_check_interval_s: float = Field(default=5.0, gt=0)
    #: Agents that stopped or are lost leave the registry (``fabric agents``, the dashboard, the
    #: metrics) once their last heartbeat is older than this.
    agent_retention_s: float = Field(default=3600.0, gt=0)
    #: Which workflows get a notification per task state change on ``{ns}.notify``
    #: (``task.<workflow>.<task>.<status>``): ``requested`` (those submitted with the
    #: ``fabric-notify-tasks`` header, as ``FabricClient.submit(on_task=...)`` and ``fabric submit
    #: --wait`` do), ``all``, or ``off``. Each is a message through the broker: sending them for every
    #: task costs about a third of the router's CPU when nobody listens.
    task_notifications: Literal["requested", "all", "off"] = "requested"


class WorkerSettings(_Section):
    #: Tasks one worker runs at once (also its prefetch per capability queue).
    concurrency: int = Field(default=8, ge=1, le=1000)
    #: Per-attempt time limit when the task gives none.
    default_timeout_s: float = Field(default=300.0, gt=0)
    #: On SIGTERM, how long running tasks may take to finish before the worker exits anyway.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    #: Seconds between heartbeats.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    #: How often the worker checks that the broker still delivers to each of its consumers (a deleted
    #: queue cancels a consumer without closing anything); a lost one is subscribed again.
    watchdog_interval_s: float = Field(default=5.0, gt=0)
    #: Failures in a row on one capability that open its circuit breaker (the worker stops taking it).
    breaker_failures: int = Field(default=5, ge=1, le=10_000)
    #: How long an open breaker waits before one probe task.
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    #: Agent score (consumer priority): the handler latency that halves the speed factor.
    score_latency_ref_s: float = Field(default=5.0, gt=0)
    #: Agent score: attempts older than this are forgotten.
    score_window_s: float = Field(default=300.0, gt=0)
    #: Agent score: the least time between two re-subscriptions of one capability with a new
    #: priority (with hysteresis on the score, so a worker does not churn its consumers).
    rescore_min_interval_s: float = Field(default=30.0, ge=0)
    #: Stable agent id; generated as ``<agent name>@<host>:<pid>`` when empty.
    agent_id: str = ""
    #: A task still running after this long has its message acked and runs on under a lease the
    #: router holds, renewed by heartbeats. Keep it well below RabbitMQ's ``consumer_timeout`` (30 min
    #: by default), which closes the channel of a delivery left unacked longer.
    lease_after_s: float = Field(default=1200.0, gt=0)
    #: A lease not renewed for this long lapses: the router runs the task again as a new attempt. A
    #: worker that could not renew one for half of it gives the attempt up (reports nothing).
    lease_ttl_s: float = Field(default=60.0, gt=0)
    #: Send a task's ``started`` event only once it has run this long (0: before the handler runs, for
    #: every task). A task that ends sooner goes from queued straight to its outcome, which carries when
    #: it began: one message, one router event and one wait less per short task, but its ``running``
    #: state is never recorded. Must stay below ``lease_after_s``.
    started_after_s: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _started_before_lease(self) -> WorkerSettings:
        if self.started_after_s and self.started_after_s >= self.lease_after_s:
            raise ValueError(
                f"started_after_s ({self.started_after_s:g}) must be below lease_after_s "
                f"({self.lease_after_s:g}): a leased task announces itself as started"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> WorkerSettings:
        if self.lease_ttl_s < 4 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_ttl_s ({self.lease_ttl_s:g}) must be at least 4 heartbeat intervals "
                f"({4 * self.heartbeat_interval_s:g}s): heartbeats renew leases"
            )
        return self


class CapabilityPolicy(_Section):
    """Failure-policy overrides for one capability; a task's own fields in the submission win."""

    #: Attempts of this capability's tasks when the submission gives none.
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    #: ``park`` or ``escalate`` once out of attempts.
    on_exhausted: OnExhausted | None = None


class PolicySettings(_Section):
    """The failure policy's choices. Precedence: the task in the submission, then ``capabilities``,
    then these defaults (and ``router.default_max_attempts``)."""

    #: What happens to a task when fabric gives up on it (attempts used up, no other agent took a
    #: reassigned task, its worker died on every attempt): ``park`` on ``{ns}.dead`` or ``escalate`` to
    #: an operator.
    on_exhausted: OnExhausted = OnExhausted.PARK
    #: Overrides per capability, e.g. ``{"llm.call": {"on_exhausted": "escalate", "max_attempts": 5}}``
    #: (``FABRIC_POLICY__CAPABILITIES`` takes it as JSON).
    capabilities: dict[str, CapabilityPolicy] = Field(default_factory=dict)

    @field_validator("capabilities")
    @classmethod
    def _valid_capabilities(cls, value: dict[str, CapabilityPolicy]) -> dict[str, CapabilityPolicy]:
        bad = [name for name in value if not re.fullmatch(CAPABILITY_PATTERN, name)]
        if bad:
            raise ValueError(
                f"not capability names: {', '.join(map(repr, bad))} (must match {CAPABILITY_PATTERN})"
            )
        return value

    def on_exhausted_for(self, capability: str, task_value: OnExhausted | None = None) -> OnExhausted:
        """The task's own choice, else its capability's, else the default."""
        if task_value is not None:
            return task_value
        override = self.capabilities.get(capability)
        if override is not None and override.on_exhausted is not None:
            return override.on_exhausted
        return self.on_exhausted

    def max_attempts_for(self, capability: str, task_value: int | None, default: int) -> int:
        """The task's own ``max_attempts``, else its capability's, else ``default``."""
        if task_value is not None:
            return task_value
        override = self.capabilities.get(capability)
        if override is not None and override.max_attempts is not None:
            return override.max_attempts
        return default


class CapabilityAlertRules(_Section):
    """Thresholds of one capability, overriding ``alerts.rules``; a missing one keeps the default."""

    error_rate: float | None = Field(default=None, gt=0, le=1)
    queue_depth: int | None = Field(default=None, ge=1)
    queue_age_s: float | None = Field(default=None, gt=0)


class AlertRuleSettings(_Section):
    """Threshold rules the active router checks every ``router.metrics_interval_s``. Each condition
    fires one alert and one ``resolved`` alert when it clears; set a threshold to null to switch its
    rule off."""

    #: Fraction of a capability's failed attempts (retried, parked, failed, escalated) over the window
    #: that fires ``capability.error_rate``; it clears below 80 % of it.
    error_rate: float | None = Field(default=0.5, gt=0, le=1)
    #: The window of the error rate.
    error_rate_window_s: float = Field(default=300.0, ge=10, le=86_400)
    #: Fewer attempts than this in the window say nothing (no alert, and a firing one clears).
    error_rate_min_attempts: int = Field(default=10, ge=1)
    #: Tasks ready in a capability queue that fire ``queue.depth``.
    queue_depth: int | None = Field(default=1000, ge=1)
    #: Seconds the oldest task dispatched to a capability queue may wait unstarted (``queue.age``).
    queue_age_s: float | None = Field(default=600.0, gt=0)
    #: Seconds a capability may have queued work and no live agent before ``capability.no_agent``.
    no_agent_after_s: float | None = Field(default=60.0, ge=0)
    #: ``agent.lost`` when an agent misses three heartbeats without having said it was draining.
    agent_lost: bool = True
    #: ``breaker.open`` while a live agent's circuit breaker for a capability is open or half-open.
    breaker_open: bool = True
    #: Thresholds per capability, e.g. ``{"llm.call": {"error_rate": 0.2, "queue_depth": 50}}``.
    capabilities: dict[str, CapabilityAlertRules] = Field(default_factory=dict)

    def threshold(self, capability: str, name: str) -> Any:
        """The capability's own value of threshold ``name``, else the default."""
        override = self.capabilities.get(capability)
        value = getattr(override, name) if override is not None else None
        return getattr(self, name) if value is None else value


class AlertSettings(_Section):
    """Where alerts go besides ``{ns}.alerts`` (which always gets them), and how hard fabric tries."""

    #: URLs every alert is POSTed to as JSON (http or https).
    webhooks: list[AnyHttpUrl] = Field(default_factory=list)
    #: Extra HTTP headers of each POST, e.g. ``{"Authorization": "Bearer ..."}`` (kept secret in logs).
    webhook_headers: dict[str, SecretStr] = Field(default_factory=dict)
    #: How long one POST may take (connect, send, read the status line).
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: Further attempts after a failed POST (connection error, timeout, 5xx, 408, 429).
    webhook_retries: int = Field(default=3, ge=0, le=20)
    #: Wait before the first retry; doubled for each further one.
    webhook_backoff_s: float = Field(default=1.0, ge=0, le=300)

    @field_validator("webhook_headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"the value of header {name!r} holds a line break")
        return value

    #: Threshold rules (error rate, queue depth and age, no agent, agent lost, breaker open).
    rules: AlertRuleSettings = Field(default_factory=AlertRuleSettings)
    #: Alerts waiting to be delivered at most; beyond that new ones are dropped (logged, counted), so
    #: a slow webhook never holds memory or the router.
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)


#: A worker's health port when ``FABRIC_HTTP__PORT`` is not set: not the router's 8080, so a worker started
#: before the router (or left running while it restarts) never takes the router's API and dashboard port.
WORKER_HTTP_PORT = 8081


class HttpSettings(_Section):
    #: Port of the HTTP API (router) and health endpoints. Unset, a worker uses 8081 (then any free port).
    port: int = Field(default=8080, ge=0, le=65535)
    host: str = "127.0.0.1"
    #: Base URL of the Jaeger UI: the dashboard links each workflow to ``<jaeger_url>/trace/<trace id>``.
    #: Empty: no trace links.
    jaeger_url: str = Field(default="http://localhost:16686", pattern=r"^(https?://\S+)?$")
    #: How often the dashboard's live stream (``/api/v1/stream``) pushes a snapshot.
    stream_interval_s: float = Field(default=1.0, ge=0.1, le=60.0)

    @property
    def worker_port(self) -> int:
        """The port a worker's health endpoints try first: ``port`` when it was set, else 8081."""
        return self.port if "port" in self.model_fields_set else WORKER_HTTP_PORT


class FabricSettings(BaseSettings):
    """Every fabric setting. Build it once with :func:`load_settings` and pass it down.

    Example:
        >>> settings = load_settings(namespace="test1")
        >>> settings.store.url
        'sqlite:///fabric.db'
    """

    model_config = SettingsConfigDict(
        env_prefix="FABRIC_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    #: Prefix of every exchange and queue name.
    namespace: str = DEFAULT_NAMESPACE
    #: Profile whose YAML file (``configs/<profile>.yaml``) provides defaults.
    profile: str | None = None
    #: Folder holding the profile files.
    config_dir: Path = Path("configs")
    #: Broker URL.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    #: Log level of fabric processes.
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    store: StoreSettings = Field(default_factory=StoreSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().partition("://")[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"must be an AMQP URL (amqp://user:password@host:5672/vhost or amqps://...), not {scheme}://"
                if "://" in value.get_secret_value()
                else "must be an AMQP URL (amqp://user:password@host:5672/vhost or amqps://...)"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        if not _NAMESPACE_RE.fullmatch(value):
            raise ValueError("must match [a-z0-9][a-z0-9_-]{0,63} (it prefixes every queue name)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        return (init_settings, env_settings, _ProfileSource(settings_cls, init_kwargs))


class _ProfileSource(PydanticBaseSettingsSource):
    """Reads ``<config_dir>/<profile>.yaml`` when ``profile`` (or ``FABRIC_PROFILE``) names a profile."""

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._init_kwargs = init_kwargs

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        profile = self._init_kwargs.get("profile") or os.environ.get("FABRIC_PROFILE")
        if not profile:
            return {}
        config_dir = Path(
            self._init_kwargs.get("config_dir") or os.environ.get("FABRIC_CONFIG_DIR", "configs")
        )
        path = config_dir / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"FABRIC_PROFILE={profile!r} but {path} does not exist "
                f"(set FABRIC_CONFIG_DIR to the folder holding {profile}.yaml)"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
        return data


def load_settings(**overrides: Any) -> FabricSettings:
    """Build the settings tree, turning validation errors into one :class:`ConfigError` naming each setting.

    Raises:
        ConfigError: a setting is invalid or unknown; the message names it as an environment variable.
    """
    _check_environment()
    try:
        return FabricSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = "__".join(str(part) for part in err["loc"]).upper()
            value = err.get("input")
            shown = "" if isinstance(value, dict) or "amqp_url" in loc.lower() else f" (got {value!r})"
            problems.append(f"FABRIC_{loc}: {err['msg']}{shown}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from exc


def _check_environment() -> None:
    """Refuse FABRIC_* variables that name no setting: a typo must not be silently ignored."""
    problems = [p for p in map(unknown_setting, sorted(os.environ)) if p is not None]
    if problems:
        raise ConfigError("\n".join(problems))


def unknown_setting(name: str, model: type[BaseModel] = FabricSettings) -> str | None:
    """Why the environment variable ``name`` names no setting, with the closest names; None when it names
    one (or is no ``FABRIC_*`` variable).

    Example:
        >>> unknown_setting("FABRIC_WORKER__CONCURENCY")
        'unknown setting FABRIC_WORKER__CONCURENCY: did you mean FABRIC_WORKER__CONCURRENCY?'
    """
    if not name.upper().startswith("FABRIC_"):
        return None
    parts = name[len("FABRIC_") :].lower().split("__")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = "FABRIC_" + "".join(f"{p.upper()}__" for p in parts[:depth])
            rest = "".join(f"__{p.upper()}" for p in parts[depth + 1 :])
            close = [
                prefix + c.upper() + rest for c in difflib.get_close_matches(part, list(fields), cutoff=0.6)
            ]
            if close:
                return f"unknown setting {name}: did you mean {' or '.join(close)}?"
            known = ", ".join(prefix + f.upper() for f in sorted(fields))
            return f"unknown setting {name}; known settings here: {known}"
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None  # a value (or a mapping such as policy.capabilities): pydantic checks the rest
        model = annotation
    return None
