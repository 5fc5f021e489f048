"""vpool's configuration: one YAML file, every field overridable by `VPOOL_...` variables.

Precedence, highest first: command-line flags, environment variables
(`VPOOL_GATEWAY__PORT=9000`, nested with `__`; plus the shorthands `VPOOL_API_KEYS=a,b`
and `VPOOL_REGISTRATION_TOKEN=t`), the YAML file, the defaults below.
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# How the gateway picks among a model's ready workers: see vpool/gateway/routing.py.
RoutingName = Literal["least_outstanding", "power_of_two", "prefix", "round_robin"]


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


class ModelTimeouts(BaseModel):
    """Timeouts for one model, each falling back to the gateway's own when not given."""

    model_config = ConfigDict(extra="forbid")

    connect_timeout_s: float | None = Field(None, gt=0)
    first_byte_timeout_s: float | None = Field(None, gt=0)
    read_timeout_s: float | None = Field(None, gt=0)


class PrefixRoutingSettings(BaseModel):
    """How the `prefix` routing policy keys a request and bounds a worker's share
    (vpool/gateway/prefix.py, vpool/gateway/routing.py `PrefixAffinity`)."""

    model_config = ConfigDict(extra="forbid")

    # Characters, not tokens (the gateway has no tokenizer): 256 is about 64 tokens at four
    # characters a token, four of vLLM's 16-token cache blocks.
    block_chars: int = Field(256, ge=1)
    # The key is the hash of the prompt's first 8 blocks (about 2,000 characters, 500 tokens):
    # long enough that one system prompt's traffic stays together and a conversation keeps
    # its key as it grows, short enough that the work per request stays small.
    prefix_blocks: int = Field(8, ge=1)
    # No worker takes a request while it holds more than (1 + epsilon) times the mean
    # outstanding count: 0.25 keeps a hot prefix's spill to few workers (more cache reuse)
    # while the busiest worker's queue stays within a quarter of the mean.
    epsilon: float = Field(0.25, gt=0, le=10)
    # Chat only: also hash the conversation's first user message, so that conversations on
    # one long system prompt spread over the workers (each keeps its own history on one)
    # instead of all following their system prompt to one worker. For a few system prompts
    # that every worker's cache holds; off when there are more than a cache holds.
    by_conversation: bool = False


class KeyConfig(BaseModel):
    """A key written in the config file, with what a key made by `vpool keys create` may have."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    name: str = ""
    models: list[str] | None = None
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_parallel: int | None = Field(None, gt=0)
    priority: int = Field(1, ge=1)


class FairShareSettings(BaseModel):
    """When every ready worker of a model is full, requests wait in a queue per key and go
    out in turn across keys, weighted by each key's `priority` (vpool/gateway/fair_share.py)."""

    enabled: bool = True
    # Past these a request is refused at once: 429 when its key has this many waiting, 503
    # when the gateway has `max_queued` waiting in all.
    max_queued_per_key: int = Field(256, ge=1)
    max_queued: int = Field(4096, ge=1)
    # A request still waiting after this is answered 503 with Retry-After.
    max_wait_s: float = Field(60.0, gt=0)
    # Places per model one key may not take while another key has asked for that model in
    # the last `share_window_s`: the other's next request then starts at once instead of
    # waiting for one of the first key's to end. A key alone gets every place.
    reserve: int = Field(1, ge=0)
    share_window_s: float = Field(60.0, gt=0)


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Plain secrets, every one for every model; `keys` for named keys with limits.
    api_keys: list[str] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    # How often each gateway re-reads the key store (`vpool keys`): a key made or revoked
    # anywhere takes effect everywhere within about this.
    keys_refresh_interval_s: float = Field(0.5, gt=0)
    # Failed authentications from one address in a minute before its next failures answer
    # 429 instead of 401 (a right key still gets in). 0: no limit.
    max_failed_auth_per_minute: int = Field(20, ge=0)
    # A key's rpm/tpm/max_parallel cost one Redis call per request, bounded by this; past it
    # (or with Redis away) each gateway enforces its share locally (vpool/gateway/limits.py).
    limits_timeout_s: float = Field(0.25, gt=0)
    # Tokens per minute charge a request up front, its prompt plus its max_tokens, or this
    # where it sets none; the worker's own count settles it afterwards.
    default_max_tokens_estimate: int = Field(256, ge=0)
    fair_share: FairShareSettings = Field(default_factory=FairShareSettings)
    # Serving a non-loopback address with no key must be asked for explicitly.
    no_auth: bool = False
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # A request's head and body must arrive within this from its first byte: a client that
    # drips bytes to hold a connection open gets a 408 and is closed.
    request_read_timeout_s: float = Field(60.0, gt=0)
    # How often the gateway re-reads the fleet from the registry.
    refresh_interval_s: float = Field(0.5, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # Until the worker's response head; for an answer that is not streamed that is the whole
    # generation. Unset: the read timeout.
    first_byte_timeout_s: float | None = Field(None, gt=0)
    # Between two reads once the head is in. Generous by default: a long generation may go
    # quiet between tokens on a loaded engine.
    read_timeout_s: float = Field(600.0, gt=0)
    # The three timeouts for some models, by model name (a catalog model's aliases follow it).
    model_timeouts: dict[str, ModelTimeouts] = Field(default_factory=dict)
    # Tries per request, on different workers, while nothing has reached the client: after a
    # connection refused, reset or timed out, no answer in time, or a 502/503 answer.
    max_attempts: int = Field(2, ge=1)
    # Pause before a retry: this times the attempts made so far (50 ms, then 100 ms, ...).
    retry_backoff_s: float = Field(0.05, ge=0)
    # A worker failing this many requests in a row leaves this gateway's rotation for
    # `eject_cooldown_s`, then takes one trial request; each failed trial doubles the
    # cooldown, up to `eject_max_cooldown_s`. 0: never eject. See vpool/gateway/ejection.py.
    eject_after_failures: int = Field(3, ge=0)
    eject_cooldown_s: float = Field(10.0, gt=0)
    eject_max_cooldown_s: float = Field(60.0, gt=0)
    # least_outstanding measured best (benchmarks/README.md, "Routing quality");
    # power_of_two may suit many gateways sharing stale load figures; prefix sends requests
    # sharing a prompt's start to the same worker, within a load bound (`prefix_routing`).
    routing: RoutingName = "least_outstanding"
    # The routing policy of some models, by model name (a catalog model's aliases follow it).
    model_routing: dict[str, RoutingName] = Field(default_factory=dict)
    # The `prefix` policy's blocks and load bound, for every model that uses it.
    prefix_routing: PrefixRoutingSettings = Field(default_factory=PrefixRoutingSettings)
    # Processes sharing the port (SO_REUSEPORT); more than one needs a shared registry.
    processes: int = Field(1, ge=1, le=64)
    # On SIGTERM: how long open answers (streams too) may take to finish before they are cut.
    graceful_shutdown_s: float = Field(30.0, gt=0)
    # The URL others reach this gateway at, announced in the registry for Prometheus discovery
    # (the controller's `/v1/targets`). Unset: http://HOST:PORT, this host's name for 0.0.0.0.
    advertise_url: str | None = Field(None, pattern=r"^https?://")

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[str]) -> list[str]:
        return [k.strip() for k in keys if k.strip()]

    @model_validator(mode="after")
    def _no_open_public_bind(self) -> GatewaySettings:
        if self.host not in LOOPBACK_HOSTS and self.is_open and not self.no_auth:
            raise ValueError(
                f"refusing to serve {self.host} with no API key: set gateway.api_keys "
                "(or VPOOL_API_KEYS), or pass --no-auth to serve it open on purpose"
            )
        return self

    @property
    def is_open(self) -> bool:
        """No key in the config file (the key store may still hold some)."""
        return not self.api_keys and not self.keys


class LaunchSettings(BaseModel):
    """How the controller launches jobs (`vpool launch`): where their files go, how workers
    reach back, which catalog names the models."""

    model_config = ConfigDict(extra="forbid")

    # LOG_DIR/FAMILY/NAME.JOB/ holds each job's sbatch script, launch.json and worker log.
    log_dir: Path = Field(default_factory=lambda: default_cache_dir() / "jobs")
    # The interpreter jobs run `vpool worker` with (on a cluster: a path every node sees).
    python: str = Field(default_factory=lambda: sys.executable)
    # The controller's URL as workers on other hosts reach it; unset: this host's name.
    controller_url: str | None = None
    # Where custom models' weights live, as FAMILY-VARIANT directories.
    weights_dir: Path | None = None
    # User catalogs merged over the built-in one, in order (also VPOOL_CATALOG=a:b).
    catalog: list[Path] = Field(default_factory=list)
    # How often running jobs' states are read again (squeue, the registry, the processes).
    poll_interval_s: float = Field(2.0, gt=0)
    # `vpool shutdown`: how long a worker may drain before it is killed.
    shutdown_grace_s: float = Field(300.0, gt=0)
    # `--launcher ray`: the Ray cluster's dashboard (job submission) address, e.g.
    # http://ray-head:8265, when a launch names none; unset: RAY_ADDRESS of the controller.
    ray_address: str | None = None
    # `--launcher skypilot`: what the cloud VM's setup pip-installs: a requirement (default:
    # this vpool's release with its GPU engine), a wheel's URL or a wheel file here (mounted).
    skypilot_install: str | None = None


class ControllerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    registration_token: str | None = None
    # Guards the admin API (`/admin/v1/...`: jobs). Unset: it answers loopback clients only.
    admin_token: str | None = None
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # A worker that misses this many heartbeats drops out of routing.
    expiry_intervals: int = Field(3, ge=1)
    health_probe_timeout_s: float = Field(5.0, gt=0)

    @property
    def worker_ttl_s(self) -> float:
        return self.heartbeat_interval_s * self.expiry_intervals


class RegistrySettings(BaseModel):
    url: str = "memory://"
    key_prefix: str = "vpool"
    # API keys with a memory:// registry (`vpool up`): a SQLite file, so they outlive the
    # process. Unset: `keys.sqlite3` in the cache directory. With Redis, keys live there.
    keys_file: Path | None = None
    # Every Redis call is bounded: a frozen Redis must not freeze the gateway.
    timeout_s: float = Field(1.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError("registry.url must start with memory://, redis://, rediss:// or unix://")
        return url


class ModelSpec(BaseModel):
    """One model in the catalog: what a worker loads and the names it answers to."""

    name: str = Field(min_length=1)
    model: str = Field(min_length=1, description="local path, hub id, or builtin:<name>")
    aliases: list[str] = Field(default_factory=list)
    runner: Literal["generate", "pooling"] = "generate"
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(None, gt=0)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    chat_template: Path | None = None
    replicas: int = Field(1, ge=0)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # vLLM's executor: None lets vLLM pick (one process per GPU on one node); "ray" spreads
    # TP x PP over a Ray cluster's GPUs, several nodes included (RAY_ADDRESS names the cluster).
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None

    @property
    def served_names(self) -> list[str]:
        return [self.name, *[a for a in self.aliases if a != self.name]]


class EndpointSpec(BaseModel):
    """An OpenAI-compatible server vpool did not start (`vllm serve`, SGLang, ...)."""

    url: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("endpoint url must start with http:// or https://")
        return url.rstrip("/")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vpool"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VPOOL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    models: list[ModelSpec] = Field(default_factory=list)
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command-line flags arrive as init data; then the environment; then the file.
        return (init_settings, env_settings, _FileSource(settings_cls))

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        seen: set[str] = set()
        for spec in self.models:
            for name in spec.served_names:
                if name in seen:
                    raise ValueError(f"model name `{name}` appears twice in the catalog")
                seen.add(name)
        return self

    def catalog_names(self) -> set[str]:
        """Every model name the configuration promises, served yet or not."""
        names = {n for spec in self.models for n in spec.served_names}
        names.update(n for ep in self.endpoints for n in ep.models)
        return names


_file_data: ContextVar[dict[str, Any] | None] = ContextVar("vpool_config_file_data", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's data, below the environment in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_file_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get() or {})


def _shorthand_env() -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if keys := os.environ.get("VPOOL_API_KEYS"):
        overrides.setdefault("gateway", {})["api_keys"] = [k for k in keys.split(",") if k.strip()]
    if token := os.environ.get("VPOOL_REGISTRATION_TOKEN"):
        overrides.setdefault("controller", {})["registration_token"] = token
    if admin := os.environ.get("VPOOL_ADMIN_TOKEN"):
        overrides.setdefault("controller", {})["admin_token"] = admin
    return overrides


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the YAML file (if any), apply the environment, then `overrides` (CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at its top level")
        data = loaded
    data = _deep_merge(data, _shorthand_env())
    token = _file_data.set(data)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)
