"""`vpool usage` as a user runs it, against a real controller app on a socket.

The controller (one for the module) keeps its keys and usage in a SQLite file; the counts are
written into that store as a gateway writes them (`add_usage`), on the server's own loop. The
CLI runs in-process (typer's CliRunner) with VPOOL_CONTROLLER_URL and VPOOL_ADMIN_TOKEN set,
and the tests read what it prints: table cells, JSON, CSV, exit status and error sentences.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.processes import free_port
from tests.unit.conftest import Servers
from vpool.cli import app
from vpool.cli.common import parse_time
from vpool.client import VpoolClient
from vpool.config import ControllerSettings
from vpool.controller.app import create_controller_app
from vpool.registry.key_stores import SqliteKeyStore
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.usage import HOUR_S, Counts, UsageBatch, UsageQuery, UsageRow, hour_of

ADMIN = "admin-token-for-usage-tests"
LLAMA, QWEN = "llama-3-8b", "qwen-7b"
NOW = time.time()
# Two whole UTC days a month back (so `--since 24h` reaches none of them), and the hour before
# last (which `--since 24h` does reach).
DAY1 = hour_of(NOW) // 86400 * 86400 - 30 * 86400
DAY2 = DAY1 + 86400
RECENT = hour_of(NOW) - 2 * HOUR_S
CSV_FIELDS = [
    "start", "key_id", "key_name", "model", "requests", "errors", "prompt_tokens",
    "completion_tokens", "total_tokens",
]  # fmt: skip


@dataclass
class Fleet:
    url: str
    search: str  # key ids
    ads: str


@dataclass(frozen=True)
class Use:
    start: int
    key: str  # "search", "ads" or "-" (no key)
    model: str
    requests: int
    prompt: int
    completion: int
    errors: int


USES = [
    Use(DAY1 + 10 * HOUR_S, "search", LLAMA, 10, 1000, 200, 1),
    Use(DAY1 + 11 * HOUR_S, "search", LLAMA, 5, 500, 100, 0),
    Use(DAY1 + 11 * HOUR_S, "ads", LLAMA, 2, 20, 4, 0),
    Use(DAY2 + 9 * HOUR_S, "search", QWEN, 3, 300, 60, 2),
    Use(DAY2 + 9 * HOUR_S, "-", LLAMA, 1, 7, 3, 0),
    Use(RECENT, "ads", QWEN, 4, 40, 8, 0),
]


@pytest.fixture(scope="module")
def fleet(module_servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    store = SqliteKeyStore(tmp_path_factory.mktemp("usage") / "keys.sqlite3")
    server = module_servers.serve(
        create_controller_app(ControllerSettings(admin_token=ADMIN), MemoryRegistry(), key_store=store)
    )
    with VpoolClient(server.url, admin_token=ADMIN) as admin:
        ids = {name: admin.create_key(f"team-{name}")["key"]["key_id"] for name in ("search", "ads")}
    ids["-"] = "-"
    batch = UsageBatch()
    for use in USES:
        batch.add(
            (use.start, ids[use.key], use.model), Counts(use.requests, use.prompt, use.completion, use.errors)
        )
    server.call(store.add_usage(batch))
    return Fleet(server.url, ids["search"], ids["ads"])


def vpool(url: str, *args: str, token: str | None = ADMIN) -> tuple[int, str, str]:
    """`vpool ARGS`: exit status, stdout, stderr."""
    env = {"VPOOL_CONTROLLER_URL": url, "VPOOL_ADMIN_TOKEN": token, "COLUMNS": "250", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def cells(out: str) -> list[list[str]]:
    """The table's header, body and totals rows, as stripped cells."""
    lines = [line for line in out.splitlines() if line[:1] in ("│", "┃")]
    return [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in lines]


def csv_rows(out: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == CSV_FIELDS
    return list(reader)


def iso(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day(start: int, hour: int = 0) -> str:
    return datetime.fromtimestamp(start + hour * HOUR_S, UTC).strftime("%Y-%m-%dT%H:%M")


def shown(rows: list[dict[str, str]]) -> list[tuple[str, str, str, int, int, int, int, int]]:
    return [
        (r["start"], r["key_id"], r["model"], int(r["requests"]), int(r["errors"]),
         int(r["prompt_tokens"]), int(r["completion_tokens"]), int(r["total_tokens"]))
        for r in rows
    ]  # fmt: skip


def expected(fleet: Fleet, *uses: Use) -> list[tuple[str, str, str, int, int, int, int, int]]:
    """What `uses` look like in CSV, in the controller's order: by time, then key id and model."""
    ids = {"search": fleet.search, "ads": fleet.ads, "-": "-"}
    return sorted(
        (
            iso(u.start),
            ids[u.key],
            u.model,
            u.requests,
            u.errors,
            u.prompt,
            u.completion,
            u.prompt + u.completion,
        )
        for u in uses
    )


# --- what it prints ---------------------------------------------------------------------------


def test_the_table_has_a_row_per_key_model_and_hour_and_a_totals_row(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage")
    assert code == 0, err
    header, *body, totals = cells(out)
    assert header == [
        "hour", "key id", "key name", "model", "requests", "errors", "prompt tokens",
        "completion tokens", "total tokens",
    ]  # fmt: skip
    as_csv = [(f"{row[0].replace(' ', 'T')}:00Z", row[1], row[3], *(int(c.replace(",", "")) for c in row[4:]))
              for row in body]  # fmt: skip
    assert as_csv == expected(fleet, *USES)
    names = {fleet.search: "team-search", fleet.ads: "team-ads", "-": "(no key)"}
    assert [row[2] for row in body] == [names[row[1]] for row in body]
    first_hour = datetime.fromtimestamp(DAY1 + 10 * HOUR_S, UTC).strftime("%Y-%m-%d %H:%M")
    assert body[0] == [first_hour, fleet.search, "team-search", LLAMA, "10", "1", "1,000", "200", "1,200"]
    assert totals == ["total", "", "", "", "25", "3", "1,867", "375", "2,242"]


def test_json_is_the_controllers_answer(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage", "--key", fleet.search, "--by", "day", "--json")
    assert code == 0, err
    printed = json.loads(out)
    answer = httpx.get(
        f"{fleet.url}/admin/v1/usage", params={"key_id": fleet.search, "by": "day"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    ).json()  # fmt: skip
    assert printed == answer
    assert printed["by"] == "day" and printed["object"] == "list"
    assert [(r["start"], r["model"], r["requests"], r["total_tokens"]) for r in printed["data"]] == [
        (DAY1, LLAMA, 15, 1800), (DAY2, QWEN, 3, 360),
    ]  # fmt: skip


def test_csv_has_a_header_iso_utc_times_exact_numbers_and_no_totals(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage", "--csv")
    assert code == 0, err
    rows = csv_rows(out)
    assert shown(rows) == expected(fleet, *USES)
    names = {fleet.search: "team-search", fleet.ads: "team-ads", "-": "(no key)"}
    assert [r["key_name"] for r in rows] == [names[r["key_id"]] for r in rows]
    assert rows[0]["start"] == iso(DAY1 + 10 * HOUR_S) == day(DAY1, 10) + ":00Z"


def test_by_day_sums_the_hours_of_one_day(fleet: Fleet) -> None:
    code, out, err = vpool(
        fleet.url, "usage", "--by", "day", "--key", fleet.search, "--model", LLAMA, "--csv"
    )
    assert code == 0, err
    assert shown(csv_rows(out)) == [(iso(DAY1), fleet.search, LLAMA, 15, 1, 1500, 300, 1800)]

    code, out, err = vpool(fleet.url, "usage", "--by", "day", "--model", LLAMA)
    assert code == 0, err
    header, *body, totals = cells(out)
    date1, date2 = (datetime.fromtimestamp(d, UTC).strftime("%Y-%m-%d") for d in (DAY1, DAY2))
    assert header[0] == "day"
    assert [row[:2] + row[4:] for row in body] == sorted([
        [date1, fleet.ads, "2", "0", "20", "4", "24"],
        [date1, fleet.search, "15", "1", "1,500", "300", "1,800"],
        [date2, "-", "1", "0", "7", "3", "10"],
    ])  # fmt: skip
    assert totals == ["total", "", "", "", "18", "1", "1,527", "307", "1,834"]


@pytest.mark.parametrize(
    ("options", "picked"),
    [
        (("--key", "{ads}"), [2, 5]),
        (("--model", QWEN), [3, 5]),
        (("--key", "{search}", "--model", QWEN), [3]),
        (("--key", "-"), [4]),
        (("--since", "{day2}"), [3, 4, 5]),  # a date: its midnight, UTC
        (("--until", "{day2}"), [0, 1, 2]),  # not included
        (("--since", "{day1}T11:00", "--until", "{day1}T12:00"), [1, 2]),
        (("--since", "{day1} 11:30"), [1, 2, 3, 4, 5]),  # the hour it falls in counts
        (("--since", "{day1}T12:00+01:00", "--until", "{day1}T12:00Z"), [1, 2]),  # zones count
        (("--since", "24h"), [5]),  # back from now
        (("--until", "24h"), [0, 1, 2, 3, 4]),
        (("--since", "40d", "--until", "28d"), [0, 1, 2, 3, 4]),
    ],
)
def test_key_model_since_and_until_pick_the_rows(
    fleet: Fleet, options: tuple[str, ...], picked: list[int]
) -> None:
    names = {"ads": fleet.ads, "search": fleet.search, "day1": day(DAY1)[:10], "day2": day(DAY2)[:10]}
    code, out, err = vpool(fleet.url, "usage", *(o.format(**names) for o in options), "--csv")
    assert code == 0, err
    assert shown(csv_rows(out)) == expected(fleet, *(USES[i] for i in picked))


def test_no_usage_is_said_and_csv_is_only_its_header(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage", "--key", "key_nobody")
    assert code == 0, err
    assert "No usage recorded" in out and "total" not in out
    code, out, err = vpool(fleet.url, "usage", "--key", "key_nobody", "--csv")
    assert code == 0, err
    assert out == ",".join(CSV_FIELDS) + "\n"


def test_help_explains_every_option_with_an_example(fleet: Fleet) -> None:
    code, out, _ = vpool(fleet.url, "usage", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    for example in ("--key key_", "--model llama-3-8b", "--since 7d", "24h", "2026-12-01T10:00",
                    "--until 2026-12-01", "--by day", "--controller http://", "--json |", "--csv >",
                    "vpool usage --by day --since 7d"):  # fmt: skip
        assert example in text, example


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"), [("--since", "soon"), ("--until", "2025-13-01"), ("--since", "0d"), ("--until", "7")]
)
def test_a_bad_time_is_exit_2_naming_the_option_and_the_value(fleet: Fleet, option: str, value: str) -> None:
    code, out, err = vpool(fleet.url, "usage", option, value)
    assert code == 2 and out == ""
    assert option in err and f"`{value}`" in err
    code, out, _ = vpool(fleet.url, "usage", option, value, "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["code"] == "invalid_options" and option in error["message"]


def test_json_with_csv_is_exit_2_and_prints_nothing(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage", "--json", "--csv")
    assert code == 2 and out == ""
    assert "--json or --csv, not both" in err


def test_since_not_before_until_is_the_controllers_400(fleet: Fleet) -> None:
    code, out, err = vpool(fleet.url, "usage", "--since", day(DAY2), "--until", day(DAY1))
    assert code == 2 and out == ""
    assert "`since` must be before `until`" in err
    code, out, _ = vpool(fleet.url, "usage", "--since", "2d", "--until", "2d", "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["status"] == 400 and "`since` must be before `until`" in error["message"]


@pytest.mark.parametrize("token", ["not-the-token", None])
def test_a_wrong_or_missing_admin_token_is_exit_2_saying_what_to_set(fleet: Fleet, token: str | None) -> None:
    code, out, err = vpool(fleet.url, "usage", token=token)
    assert code == 2 and out == ""
    assert "refused the admin request (401)" in err and "VPOOL_ADMIN_TOKEN" in err


def test_no_controller_is_exit_2_saying_where_it_looked() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = vpool(url, "usage", "--csv")
    assert code == 2 and out == ""
    assert f"The controller at {url} could not be reached" in err and "--controller" in err


class StoreAway(SqliteKeyStore):
    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        raise RegistryUnavailable("the key store is away (test)")


def test_a_key_store_that_is_away_is_exit_2_with_the_503(servers: Servers, tmp_path: Path) -> None:
    store = StoreAway(tmp_path / "keys.sqlite3")
    url = servers.serve(
        create_controller_app(ControllerSettings(admin_token=ADMIN), MemoryRegistry(), key_store=store)
    ).url
    code, out, err = vpool(url, "usage")
    assert code == 2 and out == ""
    assert "The key store is unavailable" in err
    code, out, _ = vpool(url, "usage", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and error["status"] == 503 and error["code"] == "key_store_unavailable"


# --- times, here ------------------------------------------------------------------------------


def test_durations_go_back_from_now_for_since_and_forward_for_expires() -> None:
    assert parse_time("7d", "--since", 1e9, ago=True) == 1e9 - 7 * 86400
    assert parse_time("90m", "--until", 1e9, ago=True) == 1e9 - 5400
    assert parse_time("2w", "--expires", 1e9) == 1e9 + 14 * 86400
    assert parse_time("2030-01-02T06:30", "--since", 1e9, ago=True) == 1893542400.0 + 6.5 * 3600
    with pytest.raises(ValueError, match="--since expects a duration back from now"):
        parse_time("yesterday", "--since", 1e9, ago=True)
