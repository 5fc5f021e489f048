"""`vpool keys ...` and the client's key methods against a real controller.

One `vpool controller` process for the module, over a private `redis-server` (the controller
refuses a memory:// registry: split mode needs a shared one), with an admin token; the CLI
runs as a user runs it, as a subprocess with VPOOL_CONTROLLER_URL and VPOOL_ADMIN_TOKEN.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.processes import Proc, free_port
from tests.support.redis_server import running_redis
from vpool.cli.keys import parse_expires, parse_meta
from vpool.client import AsyncVpoolClient, VpoolClient, VpoolClientError

ADMIN_TOKEN = "admin-token-for-tests"
START_TIMEOUT_S = 30.0
URLSAFE = set(string.ascii_letters + string.digits + "-_")

pytestmark = pytest.mark.skipif(
    not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()),
    reason="needs redis-server",
)


@pytest.fixture(scope="module")
def controller_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("keys-controller")
    with running_redis() as redis:
        port = free_port()
        config = workdir / "controller.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "registry": {"url": redis.url, "keys_file": str(workdir / "keys.sqlite3")},
                    "controller": {"port": port, "admin_token": ADMIN_TOKEN},
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("VPOOL_")}
        log_path = workdir / "controller.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "vpool.cli", "controller", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        proc = Proc("controller", popen, log_path)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, url)
            yield url
        finally:
            proc.stop(timeout=10)


def _wait_healthy(proc: Proc, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the controller did not start:\n{proc.log_tail()}")
        time.sleep(0.1)


def vpool(url: str, *args: str, token: str | None = ADMIN_TOKEN) -> tuple[int, str, str]:
    """`vpool ARGS` as a user runs it: exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPOOL_")}
    env.update({"VPOOL_CONTROLLER_URL": url, "COLUMNS": "250", "NO_COLOR": "1"})
    if token is not None:
        env["VPOOL_ADMIN_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", "vpool.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def admin(url: str) -> VpoolClient:
    return VpoolClient(url, admin_token=ADMIN_TOKEN)


def created(url: str, *args: str) -> dict[str, Any]:
    code, out, err = vpool(url, "keys", "create", "--json", *args)
    assert code == 0, err
    answer: dict[str, Any] = json.loads(out)
    return answer


# --- the CLI ----------------------------------------------------------------------------------


def test_create_shows_the_secret_once_and_list_and_show_never(controller_url: str) -> None:
    code, out, err = vpool(
        controller_url, "keys", "create", "--name", "team-search", "--models", "m1,m2",
        "--rpm", "60", "--meta", "team=search", "--meta", "owner=ana",
    )  # fmt: skip
    assert code == 0, err
    secrets = [word for word in out.split() if word.startswith("vp-") and len(word) > 20]
    assert len(secrets) == 1, out
    secret = secrets[0]
    assert out.count(secret) == 1
    assert "Save it now: it is not shown again" in out
    body = secret.removeprefix("vp-")
    assert set(body) <= URLSAFE and len(body) * 6 >= 128  # base64url: 6 bits a character

    with admin(controller_url) as fleet:
        (key,) = [k for k in fleet.keys() if k["name"] == "team-search"]
    assert key["key_id"] in out and key["prefix"] in out and secret.startswith(key["prefix"])
    assert key["models"] == ["m1", "m2"] and key["rpm"] == 60
    assert key["meta"] == {"team": "search", "owner": "ana"}

    for args in (("list",), ("list", "--json"), ("show", key["key_id"]), ("show", key["key_id"], "--json")):
        code, out, err = vpool(controller_url, "keys", *args)
        assert code == 0, err
        assert secret not in out and secret not in err, args
        assert key["key_id"] in out and key["prefix"] in out
        if "--json" in args:
            data = json.loads(out)
            shown = data if isinstance(data, dict) else next(k for k in data if k["key_id"] == key["key_id"])
            assert "secret" not in shown and "secret_hash" not in shown
            assert shown["models"] == ["m1", "m2"]
        else:
            assert "team-search" in out and "active" in out and "m1, m2" in out


def test_create_json_holds_the_secret_and_30d_expires_in_30_days(controller_url: str) -> None:
    made = created(controller_url, "--name", "month", "--expires", "30d")
    assert made["secret"].startswith("vp-") and made["secret"].startswith(made["key"]["prefix"])
    key = made["key"]
    assert key["models"] is None and key["rpm"] is None and key["priority"] == 1
    assert key["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=120)


def test_update_changes_limits_and_all_models_clears_the_list(controller_url: str) -> None:
    key = created(controller_url, "--name", "limited", "--models", "m1", "--rpm", "10")["key"]
    code, out, err = vpool(
        controller_url, "keys", "update", key["key_id"], "--rpm", "100", "--tpm", "5000",
        "--max-parallel", "4", "--priority", "3", "--name", "limited-2", "--json",
    )  # fmt: skip
    assert code == 0, err
    changed = json.loads(out)
    assert (changed["rpm"], changed["tpm"], changed["max_parallel"], changed["priority"]) == (100, 5000, 4, 3)
    assert changed["name"] == "limited-2" and changed["models"] == ["m1"]  # not given: kept

    code, out, err = vpool(controller_url, "keys", "update", key["key_id"], "--all-models")
    assert code == 0, err
    assert "all" in out and "5,000" in out
    with admin(controller_url) as fleet:
        assert fleet.key(key["key_id"])["models"] is None


def test_revoke_sets_the_state_revoked(controller_url: str) -> None:
    key = created(controller_url, "--name", "to-revoke")["key"]
    code, out, err = vpool(controller_url, "keys", "revoke", key["key_id"], "--json")
    assert code == 0, err
    assert json.loads(out)["revoked_at"] == pytest.approx(time.time(), abs=60)

    code, out, err = vpool(controller_url, "keys", "show", key["key_id"])
    assert code == 0, err
    assert "revoked" in out and "active" not in out


def test_an_unknown_id_is_exit_2_with_a_404_error(controller_url: str) -> None:
    code, out, _ = vpool(controller_url, "keys", "show", "key_nope", "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["status"] == 404 and error["code"] == "key_not_found" and "key_nope" in error["message"]

    code, out, err = vpool(controller_url, "keys", "revoke", "key_nope")
    assert code == 2 and out == ""
    assert "No API key with id 'key_nope'" in err


def test_a_wrong_admin_token_is_exit_2_saying_so(controller_url: str) -> None:
    code, out, err = vpool(controller_url, "keys", "list", token="not-the-token")
    assert code == 2 and out == ""
    assert "refused" in err and "admin token" in err and "VPOOL_ADMIN_TOKEN" in err


def test_bad_expires_or_meta_is_exit_2_naming_the_option_and_makes_nothing(controller_url: str) -> None:
    with admin(controller_url) as fleet:
        before = len(fleet.keys())
    code, out, err = vpool(controller_url, "keys", "create", "--name", "never-made", "--expires", "soon")
    assert code == 2 and out == ""
    assert "--expires" in err and "`soon`" in err
    code, out, _ = vpool(controller_url, "keys", "create", "--name", "never-made", "--meta", "team", "--json")
    assert code == 2
    assert "--meta" in json.loads(out)["error"]["message"] and "`team`" in json.loads(out)["error"]["message"]
    with admin(controller_url) as fleet:
        assert len(fleet.keys()) == before
        assert not [k for k in fleet.keys() if k["name"] == "never-made"]


# --- the client -------------------------------------------------------------------------------


def test_client_key_methods(controller_url: str) -> None:
    with admin(controller_url) as fleet:
        made = fleet.create_key("client", models=["a", "b"], rpm=5, meta={"k": "v"})
        key_id, secret = made["key"]["key_id"], made["secret"]
        assert secret.startswith("vp-") and made["key"]["models"] == ["a", "b"]
        assert fleet.key(key_id) == made["key"]
        assert key_id in [k["key_id"] for k in fleet.keys()]
        assert secret not in json.dumps(fleet.keys())

        changed = fleet.update_key(key_id, tpm=1000)  # only what is given is sent
        assert changed["tpm"] == 1000 and changed["rpm"] == 5 and changed["models"] == ["a", "b"]
        changed = fleet.update_key(key_id, models=None, rpm=None)  # None: sent as null, clears
        assert changed["models"] is None and changed["rpm"] is None and changed["tpm"] == 1000
        assert changed["meta"] == {"k": "v"}

        revoked = fleet.revoke_key(key_id)
        assert revoked["revoked_at"] is not None
        with pytest.raises(VpoolClientError) as refused:
            fleet.update_key(key_id, rpm=1)
        assert refused.value.status == 400 and refused.value.code == "key_revoked"
        with pytest.raises(VpoolClientError) as missing:
            fleet.key("key_missing")
        assert missing.value.status == 404 and missing.value.code == "key_not_found"

    with VpoolClient(controller_url, admin_token="wrong") as stranger, pytest.raises(VpoolClientError) as no:
        stranger.keys()
    assert no.value.status == 401


def test_async_client_key_methods(controller_url: str) -> None:
    async def scenario() -> None:
        async with AsyncVpoolClient(controller_url, admin_token=ADMIN_TOKEN) as fleet:
            made = await fleet.create_key("async", models=["a"], expires_at=time.time() + 3600)
            key_id = made["key"]["key_id"]
            assert (await fleet.key(key_id))["models"] == ["a"]
            assert key_id in [k["key_id"] for k in await fleet.keys()]
            changed = await fleet.update_key(key_id, models=None, expires_at=None)
            assert changed["models"] is None and changed["expires_at"] is None
            assert (await fleet.revoke_key(key_id))["revoked_at"] is not None

    asyncio.run(scenario())


# --- parsing, here --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90m", 5400), ("12h", 43200), ("30d", 30 * 86400), ("2w", 14 * 86400), ("45s", 45), ("1.5h", 5400)],
)
def test_expires_durations(value: str, seconds: float) -> None:
    assert parse_expires(value, now=1000.0) == 1000.0 + seconds


def test_expires_dates_are_utc_unless_they_name_a_zone() -> None:
    now = 0.0
    assert parse_expires("2030-01-02", now) == 1893542400.0
    assert parse_expires("2030-01-02T06:30", now) == 1893542400.0 + 6.5 * 3600
    assert parse_expires("2030-01-02T06:30:15", now) == 1893542400.0 + 6.5 * 3600 + 15
    assert parse_expires("2030-01-02T06:30+01:00", now) == 1893542400.0 + 5.5 * 3600
    assert parse_expires("never", now) is None
    for bad in ("", "30", "30x", "0d", "tomorrow", "2030-13-01", "2030-01-02T25:00"):
        with pytest.raises(ValueError, match="--expires"):
            parse_expires(bad, now)
    with pytest.raises(ValueError, match="in the past"):
        parse_expires("2020-01-01", time.time())


def test_meta_pairs() -> None:
    assert parse_meta(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in ("a", "=1"):
        with pytest.raises(ValueError, match="--meta"):
            parse_meta([bad])
