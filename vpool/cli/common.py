"""What every `vpool` command shares: the typer app, config loading, option types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
