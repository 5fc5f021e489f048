"""What every `vpool` command shares: the typer app, config loading, option types, times as
options give them, and how a command prints JSON or fails (one sentence on stderr, or
`{"error": {...}}` on stdout under `--json`; exit status 2)."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer

from vpool.client import VpoolClientError
from vpool.config import ConfigError, ModelSpec, RoutingName, Settings, load_settings

app = typer.Typer(
    help="vpool: one OpenAI-compatible endpoint in front of a pool of vLLM workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file: models, endpoints, gateway, registry."),
]
HostOpt = Annotated[str | None, typer.Option(help="Address the gateway binds (default 127.0.0.1).")]
PortOpt = Annotated[int | None, typer.Option(help="Gateway port (default 8000).")]
NoAuthOpt = Annotated[
    bool,
    typer.Option("--no-auth", help="Serve a non-loopback address with no API key, on purpose."),
]
RoutingOpt = Annotated[
    RoutingName | None,
    typer.Option(help="How the gateway picks among a model's workers (default least_outstanding)."),
]
RegistryOpt = Annotated[
    str | None, typer.Option("--redis-url", help="Shared registry, e.g. redis://127.0.0.1:6379/0.")
]
ControllerOpt = Annotated[
    str | None,
    typer.Option(
        "--controller",
        envvar="VPOOL_CONTROLLER_URL",
        help="The controller, e.g. --controller http://10.0.0.2:8001 (default http://127.0.0.1:8001).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


class CliError(Protocol):
    """What `fail` reports: VpoolClientError and CatalogError both are one."""

    message: str

    def body(self) -> dict[str, Any]: ...


def fail(exc: CliError, as_json: bool) -> NoReturn:
    """Report `exc` (its body as one JSON line under `--json`, else its message in red on
    stderr) and exit 2."""
    if as_json:
        typer.echo(json.dumps(exc.body()))
    else:
        typer.secho(exc.message, fg="red", err=True)
    raise typer.Exit(2)


def invalid(message: str, as_json: bool) -> NoReturn:
    """Options that do not make sense: say why (as `fail` does) and exit 2."""
    fail(VpoolClientError(message, code="invalid_options"), as_json)


def admin_refusal(exc: VpoolClientError) -> VpoolClientError:
    """401/403 from the admin API, with what to do about it."""
    if exc.status in (401, 403):
        hint = (
            "Set VPOOL_ADMIN_TOKEN to the controller's admin token (controller.admin_token)."
            if exc.status == 401
            else "Give the controller an admin token and pass it here as VPOOL_ADMIN_TOKEN."
        )
        message = f"The controller refused the admin request ({exc.status}): {exc.message} {hint}"
        return VpoolClientError(message, exc.status, exc.code)
    return exc


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, option: str, now: float, *, ago: bool = False) -> float:
    """A time as `option` gives it, in seconds since the epoch: a duration from `now` (90m,
    12h, 30d, 2w; `ago`: back from `now`), or a date or date-time, UTC unless it names a
    zone (2025-12-31, 2025-12-31T18:00). ValueError naming `option` and the value."""
    text = value.strip()
    if match := DURATION.match(text):
        seconds = float(match[1]) * UNIT_S[match[2].lower()]
        if seconds <= 0:
            raise ValueError(f"{option} must be a duration above zero, got `{value}`")
        return now - seconds if ago else now + seconds
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        elif "T" in text or " " in text:
            moment = datetime.fromisoformat(text)
        else:
            raise ValueError
    except ValueError:
        way = "back from now" if ago else "from now"
        raise ValueError(
            f"{option} expects a duration {way} (90m, 12h, 30d, 2w) or a date (YYYY-MM-DD or "
            f"YYYY-MM-DDTHH:MM[:SS], UTC unless it names a zone), got `{value}`"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def settings_from(config: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, drop_none(overrides))
    except ConfigError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


def drop_none(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def start_logging() -> None:
    from vpool.logs import setup_logging

    setup_logging()


def model_from_flag(model: str) -> ModelSpec:
    name = Path(model).name if Path(model).exists() else model
    return ModelSpec(name=name, model=model)


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values are YAML scalars (true, 4096, 0.5, [a, b], {k: v})."""
    import yaml

    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg expects KEY=VALUE, got `{pair}`")
        parsed[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(value) if value else ""
    return parsed


def require_shared_registry(settings: Settings) -> None:
    if settings.registry.url.startswith("memory://"):
        typer.secho(
            "Split mode needs a shared registry: pass --redis-url redis://HOST:6379/0 "
            "(or registry.url in the config). For one process, use `vpool up`.",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
