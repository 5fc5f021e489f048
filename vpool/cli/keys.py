"""`vpool keys create|list|show|update|revoke`: API keys, through the controller's admin API
(`--controller URL` or VPOOL_CONTROLLER_URL, the admin token from VPOOL_ADMIN_TOKEN). Built
on `vpool.client`.

A key's secret is printed once, by `create`; the controller keeps only its SHA-256 digest.
Errors are one sentence on stderr and exit status 2 (`{"error": {...}}` on stdout under
`--json`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vpool.cli.common import ControllerOpt, JsonOpt, admin_refusal, app, fail, invalid, parse_time, print_json
from vpool.client import VpoolClient, VpoolClientError

KEYS_HELP = (
    "API keys for the gateways: make, list, change and revoke them, through the controller "
    "(--controller or VPOOL_CONTROLLER_URL; the admin token from VPOOL_ADMIN_TOKEN). A secret is "
    "shown once, when made: the controller keeps only its SHA-256 digest."
)
keys_app = typer.Typer(help=KEYS_HELP, no_args_is_help=True)
app.add_typer(keys_app, name="keys", help=KEYS_HELP)

KeyArg = Annotated[str, typer.Argument(help="The key's id (key_..., as `vpool keys list` shows).")]
ModelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--models",
        help="The only models the key may use, comma-separated (repeatable). Default: every model.",
    ),
]
RpmOpt = Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute at most.")]
TpmOpt = Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute at most.")]
ParallelOpt = Annotated[
    int | None, typer.Option("--max-parallel", min=1, help="Requests in flight at once, at most.")
]
PriorityOpt = Annotated[
    int | None,
    typer.Option(
        "--priority",
        min=1,
        help="Its weight in the fair share of a full model: 2 gets two turns to a priority-1 "
        "key's one (default 1).",
    ),
]
ExpiresOpt = Annotated[
    str | None,
    typer.Option(
        "--expires",
        help="When the key stops working: a duration from now (90m, 12h, 30d, 2w; s m h d w) or a "
        "UTC date or time (2025-12-31, 2025-12-31T18:00). `never`: no expiry.",
    ),
]
MetaOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--meta", help="A label as KEY=VALUE (repeatable), e.g. --meta team=search --meta owner=ana."
    ),
]


def parse_expires(value: str, now: float | None = None) -> float | None:
    """`--expires` as seconds since the epoch (None: `never`); ValueError saying why not."""
    now = time.time() if now is None else now
    if value.strip().lower() == "never":
        return None
    at = parse_time(value, "--expires", now)
    if at <= now:
        raise ValueError(f"--expires `{value}` is in the past")
    return at


def parse_meta(pairs: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--meta expects KEY=VALUE, got `{pair}`")
        meta[key.strip()] = value
    return meta


def parse_models(values: list[str]) -> list[str]:
    models = [m.strip() for value in values for m in value.split(",") if m.strip()]
    if not models:
        raise ValueError("--models needs at least one model name (or leave it out for every model)")
    return models


def _when(at: float | None, none: str = "-") -> str:
    if at is None:
        return none
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M")


def _limit(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def key_state(key: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if key.get("revoked_at") is not None:
        return "revoked"
    expires = key.get("expires_at")
    return "expired" if expires is not None and expires <= now else "active"


def _models(key: dict[str, Any]) -> str:
    return "all" if key.get("models") is None else ", ".join(key["models"]) or "(none)"


def _key_table(key: dict[str, Any]) -> Table:
    table = Table(show_header=False, title=f"API key {key['key_id']}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("ID", key["key_id"]), ("Name", key["name"]), ("Prefix", key["prefix"]),
        ("State", key_state(key)), ("Models", _models(key)), ("Requests/min", _limit(key["rpm"])),
        ("Tokens/min", _limit(key["tpm"])), ("Max parallel", _limit(key["max_parallel"])),
        ("Priority", str(key["priority"])), ("Created", _when(key["created_at"])),
        ("Last used", _when(key["last_used_at"], "never")), ("Expires", _when(key["expires_at"], "never")),
    ]  # fmt: skip
    if key.get("revoked_at") is not None:
        rows.append(("Revoked", _when(key["revoked_at"])))
    for name, value in sorted((key.get("meta") or {}).items()):
        rows.append((f"meta.{name}", value))
    for label, value in rows:
        table.add_row(label, value)
    return table


def _fields(
    models: list[str] | None,
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
    priority: int | None,
    expires: str | None,
    meta: list[str] | None,
    as_json: bool,
) -> dict[str, Any]:
    """The options given, parsed (an error exits 2 naming the option)."""
    fields: dict[str, Any] = {
        "rpm": rpm, "tpm": tpm, "max_parallel": max_parallel, "priority": priority,
    }  # fmt: skip
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        if models is not None:
            fields["models"] = parse_models(models)
        if expires is not None:
            fields["expires_at"] = parse_expires(expires)
        if meta:
            fields["meta"] = parse_meta(meta)
    except ValueError as exc:
        invalid(str(exc), as_json)
    return fields


@keys_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for, e.g. team-search.")],
    models: ModelsOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_parallel: ParallelOpt = None,
    priority: PriorityOpt = None,
    expires: ExpiresOpt = None,
    meta: MetaOpt = None,
    controller: ControllerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a key and print its secret, once.

    The controller keeps only the secret's SHA-256 digest: save it when it is printed. Every
    gateway accepts the key within about a second."""
    fields = _fields(models, rpm, tpm, max_parallel, priority, expires, meta, as_json)
    try:
        with VpoolClient(controller) as fleet:
            made = fleet.create_key(name, **fields)
    except VpoolClientError as exc:
        fail(admin_refusal(exc), as_json)
    if as_json:
        print_json(made)
        return
    key = made["key"]
    typer.echo(f"Created API key {key['key_id']} ({key['name']}), prefix {key['prefix']}")
    typer.echo(f"  models: {_models(key)}   expires: {_when(key['expires_at'], 'never')} (UTC)")
    typer.echo("")
    typer.echo(f"  {made['secret']}")
    typer.echo("")
    typer.secho("Save it now: it is not shown again.", fg="yellow", bold=True)
    typer.echo("Clients send it as `Authorization: Bearer SECRET`.")


@keys_app.command("list")
def list_keys(controller: ControllerOpt = None, as_json: JsonOpt = False) -> None:
    """Every key, revoked and expired ones included: limits, use and state (never a secret)."""
    try:
        with VpoolClient(controller) as fleet:
            found = fleet.keys()
    except VpoolClientError as exc:
        fail(admin_refusal(exc), as_json)
    if as_json:
        print_json(found)
        return
    table = Table(title="API keys", title_justify="left")
    columns = ("id", "name", "prefix", "models", "rpm", "tpm", "parallel", "priority", "created",
               "last used", "expires", "state")  # fmt: skip
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "prefix"))
    for key in found:
        table.add_row(
            key["key_id"], key["name"], key["prefix"], _models(key), _limit(key["rpm"]),
            _limit(key["tpm"]), _limit(key["max_parallel"]), str(key["priority"]),
            _when(key["created_at"]), _when(key["last_used_at"], "never"),
            _when(key["expires_at"], "never"), key_state(key),
        )  # fmt: skip
    Console().print(table if found else "No API keys. Make one with: vpool keys create --name NAME")


@keys_app.command()
def show(key_id: KeyArg, controller: ControllerOpt = None, as_json: JsonOpt = False) -> None:
    """One key: its models, limits, expiry, labels and state (never its secret)."""
    _show_answer(controller, as_json, lambda fleet: fleet.key(key_id))


@keys_app.command()
def update(
    key_id: KeyArg,
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models", help="The only models the key may use from now on, comma-separated (repeatable)."
        ),
    ] = None,
    all_models: Annotated[
        bool, typer.Option("--all-models", help="Clear the model list: the key may use every model.")
    ] = False,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_parallel: ParallelOpt = None,
    priority: PriorityOpt = None,
    expires: ExpiresOpt = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="A label as KEY=VALUE (repeatable): together they replace the key's."),
    ] = None,
    controller: ControllerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's name, models, limits, priority, expiry or labels.

    What is not given stays as it is, and so does the secret. Every gateway applies the
    change within about a second."""
    if all_models and models is not None:
        invalid("give --models or --all-models, not both", as_json)
    fields = _fields(models, rpm, tpm, max_parallel, priority, expires, meta, as_json)
    if all_models:
        fields["models"] = None
    if name is not None:
        fields["name"] = name
    if not fields:
        invalid(
            "nothing to change: give --name, --models, --all-models, --rpm, --tpm, --max-parallel, "
            "--priority, --expires or --meta",
            as_json,
        )
    _show_answer(controller, as_json, lambda fleet: fleet.update_key(key_id, **fields))


@keys_app.command()
def revoke(key_id: KeyArg, controller: ControllerOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key for good: every gateway refuses it within about a second.

    It stays in `vpool keys list` as revoked; make a new one to replace it."""
    try:
        with VpoolClient(controller) as fleet:
            key = fleet.revoke_key(key_id)
    except VpoolClientError as exc:
        fail(admin_refusal(exc), as_json)
    if as_json:
        print_json(key)
    else:
        typer.echo(
            f"{key['key_id']} ({key['name']}, {key['prefix']}...): revoked at {_when(key['revoked_at'])} "
            "UTC; gateways refuse it within about a second."
        )


def _show_answer(controller: str | None, as_json: bool, ask: Callable[[VpoolClient], dict[str, Any]]) -> None:
    """Ask the controller for one key (`ask`), then print it: JSON, or its table."""
    try:
        with VpoolClient(controller) as fleet:
            key = ask(fleet)
    except VpoolClientError as exc:
        fail(admin_refusal(exc), as_json)
    if as_json:
        print_json(key)
    else:
        Console().print(_key_table(key))
