"""`vpool usage`: what each key used of each model, per hour or day (UTC), from the
controller's `GET /admin/v1/usage` (`--controller URL` or VPOOL_CONTROLLER_URL, the admin
token from VPOOL_ADMIN_TOKEN). Built on `vpool.client`.

A table with a totals row by default; `--json` prints the controller's answer, `--csv` one
row per line with a header and ISO 8601 UTC times (no totals row: it is for a spreadsheet or
a billing script to add up). Errors are one sentence on stderr and exit status 2
(`{"error": {...}}` on stdout under `--json`).
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from vpool.cli.common import ControllerOpt, admin_refusal, app, fail, invalid, parse_time, print_json
from vpool.client import VpoolClient, VpoolClientError

By = Literal["hour", "day"]
COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
CSV_FIELDS = ("start", "key_id", "key_name", "model", *COUNTS)
TIME_FORMS = (
    "a duration back from now (90m, 24h, 7d, 2w) or a UTC date or time (2026-12-01, 2026-12-01T10:00)"
)

KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Only this key, by id as `vpool keys list` shows it, e.g. --key key_0123456789abcdef "
        "(`-`: requests to gateways that need no key).",
    ),
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Only this model, e.g. --model llama-3-8b.")]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since",
        help=f"From when: {TIME_FORMS}, e.g. --since 7d. The hour it falls in counts whole. "
        "Default: from the first use.",
    ),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(
        "--until",
        help=f"Until when, not included: {TIME_FORMS}, e.g. --until 2026-12-01. Default: now.",
    ),
]
ByOpt = Annotated[
    By,
    typer.Option("--by", help="One row per key, model and hour, or per UTC day, e.g. --by day."),
]
UsageJsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the controller's JSON answer, e.g. --json | jq '.data'.")
]
CsvOpt = Annotated[
    bool,
    typer.Option(
        "--csv",
        help="Print CSV: a header row, ISO 8601 UTC times, no totals row, e.g. --csv > usage.csv.",
    ),
]


@app.command("usage")
def usage(
    key: KeyOpt = None,
    model: ModelOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    by: ByOpt = "hour",
    controller: ControllerOpt = None,
    as_json: UsageJsonOpt = False,
    as_csv: CsvOpt = False,
) -> None:
    """What each API key used of each model, per hour or day (UTC): requests, errors, prompt
    and completion tokens.

    Read from the controller (the admin token from VPOOL_ADMIN_TOKEN), as the gateways wrote
    it to the key store. For example, the last week by day, or November as CSV:

        vpool usage --by day --since 7d

        vpool usage --key key_0123456789abcdef --since 2026-11-01 --until 2026-12-01 --csv
    """
    if as_json and as_csv:
        invalid("give --json or --csv, not both", as_json=False)
    now = time.time()
    try:
        start = None if since is None else parse_time(since, "--since", now, ago=True)
        end = None if until is None else parse_time(until, "--until", now, ago=True)
    except ValueError as exc:
        invalid(str(exc), as_json)
    try:
        with VpoolClient(controller) as fleet:
            rows = fleet.usage(key_id=key, model=model, since=start, until=end, by=by)
    except VpoolClientError as exc:
        fail(admin_refusal(exc), as_json)
    if as_json:
        print_json({"object": "list", "by": by, "data": rows})  # the controller's answer, as sent
    elif as_csv:
        typer.echo(usage_csv(rows), nl=False)
    elif rows:
        Console().print(usage_table(rows, by))
    else:
        typer.echo("No usage recorded for these options.")


def usage_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        moment = datetime.fromtimestamp(row["start"], UTC)
        writer.writerow({**row, "start": moment.strftime("%Y-%m-%dT%H:%M:%SZ")})
    return out.getvalue()


def usage_table(rows: list[dict[str, Any]], by: By) -> Table:
    table = Table(title=f"Usage by {by} (UTC)", title_justify="left")
    shape = "%Y-%m-%d" if by == "day" else "%Y-%m-%d %H:%M"
    for column in (by, "key id", "key name", "model"):
        table.add_column(column, overflow="fold", no_wrap=column in (by, "key id"))
    for column in ("requests", "errors", "prompt tokens", "completion tokens", "total tokens"):
        table.add_column(column, justify="right")
    for row in rows:
        when = datetime.fromtimestamp(row["start"], UTC).strftime(shape)
        table.add_row(when, row["key_id"], row["key_name"], row["model"], *(f"{row[c]:,}" for c in COUNTS))
    table.add_section()
    totals = (f"{sum(row[c] for row in rows):,}" for c in COUNTS)
    table.add_row("total", "", "", "", *totals, style="bold")
    return table
