"""No secret of a session leaks: not into a log line, not into the key store, not into
`/metrics`, not to a worker; and the admin API refuses client keys and wrong tokens.

One realistic session per store: a controller with an admin token and a gateway over one
key store (a private `redis-server`, as in split mode; the SQLite file, as in `vpool up`), a
stub worker and a dead one. Keys are made through the admin API and the `vpool keys create`
CLI, used for chat completions (whole and streamed), one revoked, one changed; wrong keys,
the admin and registration tokens and malformed `Authorization` headers are presented to the
gateway, client keys and wrong tokens to the admin API.

What is searched for every secret (each key's secret, the admin and registration tokens, the
wrong keys presented, and a marker in the prompt), whole or any 16 characters of it in a row
(a key's shown `prefix` is 11): every log record of the process at DEBUG (root, `vpool`,
`uvicorn.*`, `httpx`, `httpcore`, `redis`, ... and any other logger that does not propagate),
the process's stdout and stderr, the CLI's output and redis-server's log; every key and
value in the Redis (SCAN, TYPE, the values and DUMP) and the SQLite file's bytes with its
-wal and -shm; both servers' `/metrics`; every answer but the one that made a key; what the
worker received. Each search is shown to find what it looks for (a marker logged on every
captured logger, the store's own key ids, the key names in `/metrics`), so none passes by
seeing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets as random_secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.processes import free_port
from tests.support.redis_server import RedisServer, running_redis
from tests.support.stub_worker import Received, StubWorker
from tests.unit.conftest import Servers, assert_openai_error, server_group
from vpool.config import ControllerSettings, RegistrySettings, Settings
from vpool.controller.app import create_controller_app
from vpool.registry.key_stores import open_key_store
from vpool.registry.keys import hash_secret
from vpool.registry.memory_backend import MemoryRegistry
from vpool.serving import make_server

MODEL = "tiny-chat"
WINDOW = 16  # characters of a secret in a row that count as a leak; the shown prefix is 11
PROPAGATION_S = 5.0
CLI_TIMEOUT_S = 60.0
# Where vpool and what it runs on log; loggers that do not propagate are found at run time.
LOGGERS = (
    "",
    "vpool",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "httpx",
    "httpcore",
    "redis",
    "asyncio",
    "fastapi",
    "starlette",
)
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

needs_redis = pytest.mark.skipif(
    not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()), reason="needs redis-server"
)


# --- finding a secret -------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    label: str
    value: str


def _random(prefix: str) -> str:
    return prefix + random_secrets.token_urlsafe(24)


def _first_run(text: str, value: str) -> tuple[int, int, int, int] | None:
    """Where the longest stretch of `value` around its first WINDOW-long match lies in
    `text`: (start, end) in text, (start, end) in value."""
    width = min(WINDOW, len(value))
    for i in range(len(value) - width + 1):
        at = text.find(value[i : i + width])
        if at == -1:
            continue
        start, s_from = at, i
        while start > 0 and s_from > 0 and text[start - 1] == value[s_from - 1]:
            start, s_from = start - 1, s_from - 1
        end, s_to = at + width, i + width
        while end < len(text) and s_to < len(value) and text[end] == value[s_to]:
            end, s_to = end + 1, s_to + 1
        return start, end, s_from, s_to
    return None


def _masked(text: str, secrets: Sequence[Secret]) -> str:
    """`text` with every stretch of a secret replaced by `<label[from:to]>`."""
    for secret in secrets:
        while (run := _first_run(text, secret.value)) is not None:
            start, end, s_from, s_to = run
            text = f"{text[:start]}<{secret.label}[{s_from}:{s_to}]>{text[end:]}"
    return text


def find_leaks(where: str, text: str, secrets: Sequence[Secret]) -> list[str]:
    """One line per secret found in `text`: which, how much, where; never the secret."""
    leaks = []
    for secret in secrets:
        run = _first_run(text, secret.value)
        if run is None:
            continue
        start, end, s_from, s_to = run
        line = text.count("\n", 0, start) + 1
        excerpt = _masked(text[max(0, start - 80) : end + 80], secrets)
        leaks.append(
            f"{secret.label} ({s_to - s_from} of its {len(secret.value)} characters) "
            f"in {where}, line {line}: {excerpt!r}"
        )
    return leaks


def assert_no_leak(sources: dict[str, str], secrets: Sequence[Secret]) -> None:
    leaks = [leak for where, text in sources.items() for leak in find_leaks(where, text, secrets)]
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


def test_the_search_finds_a_secret_whole_or_in_part_and_never_prints_it() -> None:
    secret = Secret("key 'planted'", _random("vp-"))
    other = Secret("admin token", _random("adm-"))
    line = f"2025-01-01 INFO vpool.gateway POST /v1/chat/completions key={secret.value} 200"
    (leak,) = find_leaks("a log", line, [secret, other])
    assert "key 'planted'" in leak and "a log, line 1" in leak and f"{len(secret.value)} of its" in leak
    assert secret.value[3:] not in leak and secret.value[:WINDOW] not in leak
    # A part of it (truncated, or cut out of its prefix) is a leak too; the prefix alone is not.
    part = secret.value[5 : 5 + WINDOW + 2]
    (leak,) = find_leaks("a dump", f"first line\nauth=...{part}...", [secret, other])
    assert f"{WINDOW + 2} of its" in leak and "line 2" in leak and part not in leak
    assert find_leaks("a log", f"key {secret.value[:11]}... refused", [secret]) == []
    # Two secrets on one line: both reported, neither shown, even in the other's excerpt.
    both = find_leaks("a log", f"{secret.value} {other.value}", [secret, other])
    assert len(both) == 2 and not any(secret.value in b or other.value in b for b in both)


# --- capturing every log record ------------------------------------------------------------------


class SessionLogs(logging.Handler):
    """Every log record of the process at DEBUG, from the loggers in LOGGERS and any logger
    that does not propagate to the root.

    uvicorn configures its loggers (handlers and levels) each time a server is built, so
    `attach` is called again after each: a record is kept once however many of its loggers
    this handler sits on.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(threadName)s %(message)s"))
        self._seen: dict[int, logging.LogRecord] = {}
        self.lines: list[str] = []
        self._levels: dict[str, int] = {}
        self._on: set[logging.Logger] = set()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if id(record) in self._seen:
                return
            self._seen[id(record)] = record  # kept alive, so its id is not reused
            text = self.format(record)
            extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
            self.lines.append(f"{text} {extra!r}" if extra else text)

    def attach(self) -> None:
        named = [logging.getLogger(name) for name in LOGGERS]
        quiet = [
            logger
            for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        for logger in [*named, *quiet]:
            self._levels.setdefault(logger.name, logger.level)
            logger.setLevel(logging.DEBUG)
            if self not in logger.handlers:
                logger.addHandler(self)
            self._on.add(logger)

    def detach(self) -> None:
        for logger in self._on:
            logger.removeHandler(self)
            logger.setLevel(self._levels.get(logger.name, logging.NOTSET))

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def session_logs() -> Iterator[SessionLogs]:
    logs = SessionLogs()
    logs.attach()
    try:
        yield logs
    finally:
        logs.detach()


# --- the session ------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the session's client received, and output of the processes it ran."""

    answers: dict[str, str] = field(default_factory=dict)  # every answer but a key's making
    made: dict[str, str] = field(default_factory=dict)  # the answers that made a key
    output: dict[str, str] = field(default_factory=dict)  # stdout and stderr of processes

    def answer(self, what: str, resp: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        self.answers[f"the answer to {what} (HTTP {resp.status_code})"] = f"{headers}\n\n{resp.text}"
        return resp


def _within(seconds: float, check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def _cli(controller: str, admin_token: str, *args: str) -> subprocess.Popen[str]:
    """`vpool ARGS` as a user runs it, started now (it takes seconds to import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPOOL_")}
    env.update(
        {
            "VPOOL_CONTROLLER_URL": controller,
            "VPOOL_ADMIN_TOKEN": admin_token,
            "COLUMNS": "250",
            "NO_COLOR": "1",
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "vpool.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip


def _redis_dump(url: str) -> dict[str, str]:
    """Every key of the Redis with its type, value and DUMP, one source per key."""
    found: dict[str, str] = {}
    with redis.Redis.from_url(url) as client:
        for name in client.scan_iter(count=1000):
            kind = client.type(name).decode()
            value: Any
            if kind == "string":
                value = client.get(name)
            elif kind == "hash":
                value = client.hgetall(name)
            elif kind == "list":
                value = client.lrange(name, 0, -1)
            elif kind == "set":
                value = client.smembers(name)
            elif kind == "zset":
                value = client.zrange(name, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xrange(name)
            else:
                value = None
            dumped = client.dump(name) or b""
            text = f"{kind} {value!r}\n{dumped.decode('latin-1')}"
            found[f"Redis key {name.decode('latin-1')!r}"] = text
    return found


def _files(directory: Path) -> dict[str, str]:
    return {
        f"the file {path.name}": path.read_bytes().decode("latin-1")
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


@dataclass(frozen=True)
class Fleet:
    controller: str
    gateway: str
    registry: RegistrySettings
    keys_dir: Path


@contextlib.contextmanager
def fleet(
    servers: Servers,
    logs: SessionLogs,
    registry: RegistrySettings,
    keys_dir: Path,
    admin: str,
    registration: str,
) -> Iterator[tuple[Fleet, StubWorker]]:
    stub = servers.stub(StubWorker("stub"))
    gateway = servers.gateway(registry=registry, keys_refresh_interval_s=0.1, max_failed_auth_per_minute=1000)
    gateway.add_worker(stub, [MODEL])
    gateway.add_worker(f"http://127.0.0.1:{free_port()}", [MODEL], worker_id="dead")  # its failures log
    store = open_key_store(Settings(registry=registry))
    app = create_controller_app(
        ControllerSettings(admin_token=admin, registration_token=registration),
        MemoryRegistry(),
        key_store=store,
    )

    def controller_server(app: Any, host: str, port: int) -> Any:
        server = make_server(app, host, port, graceful_s=1.0)
        logs.attach()  # uvicorn just configured its loggers again: from here on, all of it
        return server

    controller = servers.serve(app, server_factory=controller_server)
    logs.attach()
    try:
        yield Fleet(controller.url, gateway.url, registry, keys_dir), stub
    finally:
        controller.call(store.close())


def _session(fleet: Fleet, http: httpx.Client, seen: Seen, t: dict[str, str]) -> dict[str, str]:
    """The session: returns the key ids by name. `t` holds the session's tokens."""
    admin = {"Authorization": f"Bearer {t['admin']}"}
    keys_url = f"{fleet.controller}/admin/v1/keys"
    chat_url = f"{fleet.gateway}/v1/chat/completions"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"say {t['prompt']}"}], "max_tokens": 8}

    cli = _cli(fleet.controller, t["admin"], "keys", "create", "--name", "team-cli", "--rpm", "100")
    ids: dict[str, str] = {}
    for name, fields in (
        (
            "team-api",
            {"models": [MODEL], "rpm": 600, "tpm": 100000, "max_parallel": 4, "meta": {"owner": "ana"}},
        ),
        ("to-revoke", {}),
        ("to-update", {"rpm": 60}),
    ):
        made = http.post(keys_url, headers=admin, json={"name": name, **fields})
        assert made.status_code == 201, made.text
        seen.made[f"the answer that made {name}"] = made.text
        t[name], ids[name] = made.json()["secret"], made.json()["key"]["key_id"]
    out, err = cli.communicate(timeout=CLI_TIMEOUT_S)
    seen.made["the output of `vpool keys create`"] = out
    seen.output["the stderr of `vpool keys create`"] = err
    assert cli.returncode == 0, err
    (t["team-cli"],) = [w for w in out.split() if w.startswith("vp-") and len(w) > 20]
    ids["team-cli"] = next(
        k["key_id"] for k in http.get(keys_url, headers=admin).json()["data"] if k["name"] == "team-cli"
    )

    def bearer(secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    _within(
        PROPAGATION_S, lambda: http.post(chat_url, json=chat).status_code == 401, "the gateway reads the keys"
    )
    for name in ("team-api", "to-revoke", "to-update", "team-cli"):
        _within(
            PROPAGATION_S,
            lambda name=name: (
                http.get(f"{fleet.gateway}/v1/models", headers=bearer(t[name])).status_code == 200
            ),  # type: ignore[misc]
            f"{name} gets in",
        )

    def use(name: str) -> None:
        whole = seen.answer(f"a chat with {name}", http.post(chat_url, json=chat, headers=bearer(t[name])))
        assert whole.status_code == 200, whole.text
        with http.stream("POST", chat_url, json={**chat, "stream": True}, headers=bearer(t[name])) as stream:
            body = stream.read().decode()
            seen.answer(f"a stream with {name}", stream)
        assert stream.status_code == 200 and "data: [DONE]" in body, body

    for name in ("team-api", "to-revoke", "to-update", "team-cli"):
        use(name)
    seen.answer("models", http.get(f"{fleet.gateway}/v1/models", headers=bearer(t["team-api"])))

    # Wrong keys and malformed headers, on the data path and on a FastAPI route.
    presented = {
        "a wrong vp- key": bearer(t["wrong-vp"]),
        "a wrong sk- key": bearer(t["wrong-sk"]),
        "the admin token": bearer(t["admin"]),
        "the registration token": bearer(t["registration"]),
        "a key with two words": {"Authorization": f"Bearer {t['wrong-vp']} {t['wrong-sk']}"},
        "a right key as Basic": {"Authorization": f"Basic {t['team-api']}"},
        "a right key with no scheme": {"Authorization": t["team-api"]},
        "a wrong key as Token": {"Authorization": f"Token {t['wrong-vp']}"},
        "a bare Bearer": {"Authorization": "Bearer"},
        "an empty header": {"Authorization": ""},
        "no key": {},
    }
    for what, headers in presented.items():
        for method, url, body in (("POST", chat_url, chat), ("GET", f"{fleet.gateway}/v1/models", None)):
            refused = seen.answer(f"{what} at {url}", http.request(method, url, json=body, headers=headers))
            assert assert_openai_error(refused, 401)["code"] == "invalid_api_key", what
    twice = [("Authorization", f"Bearer {t['team-api']}"), ("Authorization", f"Bearer {t['wrong-vp']}")]
    assert_openai_error(seen.answer("two keys", http.post(chat_url, json=chat, headers=twice)), 400)
    other = {**chat, "model": "other-model"}
    assert_openai_error(
        seen.answer("another model", http.post(chat_url, json=other, headers=bearer(t["team-api"]))), 404
    )

    # Revoke one, change another.
    assert (
        seen.answer("revoke", http.delete(f"{keys_url}/{ids['to-revoke']}", headers=admin)).status_code == 200
    )
    _within(
        PROPAGATION_S,
        lambda: http.post(chat_url, json=chat, headers=bearer(t["to-revoke"])).status_code == 401,
        "the revoked key is refused",
    )
    revoked = seen.answer("a revoked key", http.post(chat_url, json=chat, headers=bearer(t["to-revoke"])))
    assert assert_openai_error(revoked, 401)["code"] == "key_revoked"
    changed = http.patch(
        f"{keys_url}/{ids['to-update']}",
        headers=admin,
        json={"name": "updated-name", "rpm": 120, "models": None},
    )
    assert seen.answer("update", changed).status_code == 200 and changed.json()["name"] == "updated-name"
    use("to-update")
    ids["updated-name"] = ids.pop("to-update")

    # The admin API: the admin token only.
    refusals = {
        "a client key": bearer(t["team-api"]),
        "the key made by the CLI": bearer(t["team-cli"]),
        "a wrong admin token": bearer(t["wrong-admin"]),
        "the admin token with one character more": bearer(t["admin"] + "x"),
        "the registration token": bearer(t["registration"]),
        "the admin token as Basic": {"Authorization": f"Basic {t['admin']}"},
        "no token": {},
    }

    def records() -> list[dict[str, Any]]:  # the keys as made and changed (not when last used)
        return [{**k, "last_used_at": None} for k in http.get(keys_url, headers=admin).json()["data"]]

    before = records()
    for what, headers in refusals.items():
        for method, url, body in (
            ("GET", keys_url, None),
            ("POST", keys_url, {"name": "never-made"}),
            ("PATCH", f"{keys_url}/{ids['team-api']}", {"rpm": 1}),
            ("DELETE", f"{keys_url}/{ids['team-api']}", None),
            ("GET", f"{fleet.controller}/admin/v1/usage", None),
        ):
            resp = seen.answer(
                f"{what}: {method} {url}", http.request(method, url, json=body, headers=headers)
            )
            error = assert_openai_error(resp, 401)
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", (
                what,
                error,
            )
    assert records() == before  # nothing made, changed or revoked

    # Usage reaches the store (written once a second), then the controller reads it.
    def usage() -> list[dict[str, Any]]:
        resp = seen.answer("usage", http.get(f"{fleet.controller}/admin/v1/usage", headers=admin))
        rows: list[dict[str, Any]] = resp.json()["data"]
        return rows

    _within(
        PROPAGATION_S,
        lambda: any(r["key_id"] == ids["team-api"] and r["requests"] >= 2 for r in usage()),
        "usage reaches the store",
    )
    seen.answer("the keys", http.get(keys_url, headers=admin))
    seen.answer("a key", http.get(f"{keys_url}/{ids['team-api']}", headers=admin))
    return ids


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_no_secret_of_a_session_reaches_a_log_the_store_metrics_or_a_worker(
    store: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    t = {
        "admin": _random("adm-"),
        "registration": _random("reg-"),
        "wrong-vp": _random("vp-"),
        "wrong-sk": _random("sk-"),
        "wrong-admin": _random("adm-"),
        "prompt": f"prompt-marker-{random_secrets.token_hex(8)}",
    }
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    seen = Seen()
    stored_live: dict[str, str] = {}
    received: list[Received] = []
    marker = Secret("the marker logged on purpose", _random("marker-"))
    with session_logs() as logs, httpx.Client(timeout=10) as http:
        redis_server: RedisServer | None
        with running_redis() if store == "redis" else contextlib.nullcontext() as redis_server:
            if redis_server is not None:
                registry = RegistrySettings(url=redis_server.url)
            else:
                registry = RegistrySettings(keys_file=keys_dir / "keys.sqlite3")
            with server_group() as servers:
                with fleet(servers, logs, registry, keys_dir, t["admin"], t["registration"]) as (
                    running,
                    stub,
                ):
                    for name in LOGGERS:  # every logger captured, at DEBUG, while the session runs
                        logging.getLogger(name).debug("%s says %s", name or "root", marker.value)
                    ids = _session(running, http, seen, t)
                    gateway_metrics = seen.answer("/metrics", http.get(f"{running.gateway}/metrics"))
                    controller_metrics = http.get(f"{running.controller}/metrics")
                    seen.answer("the controller's /metrics", controller_metrics)
                    if store == "sqlite":
                        stored_live = _files(keys_dir)  # with its -wal, before the stores close
                    received = stub.received
            # The servers are stopped: the last uses and usage are written.
            if redis_server is not None:
                stored = _redis_dump(redis_server.url)
                seen.output["redis-server's log"] = redis_server.log_path.read_text(errors="replace")
            else:
                stored = {**{f"{k} (live)": v for k, v in stored_live.items()}, **_files(keys_dir)}
        session_log = logs.text()
    out, err = capfd.readouterr()
    seen.output["the test process's stdout"], seen.output["the test process's stderr"] = out, err

    made = [
        Secret(f"the secret of key {name!r}", t[name])
        for name in ("team-api", "to-revoke", "to-update", "team-cli")
    ]
    tokens = [
        Secret("the admin token", t["admin"]),
        Secret("the registration token", t["registration"]),
        Secret("a wrong vp- key presented", t["wrong-vp"]),
        Secret("a wrong sk- key presented", t["wrong-sk"]),
        Secret("a wrong admin token presented", t["wrong-admin"]),
    ]
    prompt = Secret("the prompt's text", t["prompt"])
    secrets = [*made, *tokens, prompt]

    # Each search sees what it looks for.
    assert len(find_leaks("the logs", session_log, [marker])) == 1
    missing = [
        name or "root" for name in LOGGERS if f"{name or 'root'} says {marker.value}" not in session_log
    ]
    assert not missing, f"not captured at DEBUG: {missing}"
    store_text = "\n".join(stored.values())
    for name, key_id in ids.items():
        assert key_id in store_text and f'"{name}"' in store_text, f"the store's scan missed key {name}"
    assert hash_secret(t["team-api"]) in store_text  # the digest is what it keeps
    assert gateway_metrics.status_code == 200 and 'key="team-api"' in gateway_metrics.text
    assert prompt.value in "".join(r.body.decode() for r in received)  # the worker did get the prompt

    # No secret anywhere it must not be.
    assert_no_leak({"the session's log records": session_log, **seen.output}, secrets)
    assert_no_leak(stored, secrets)
    assert_no_leak({"the gateway's /metrics": gateway_metrics.text}, secrets)
    assert_no_leak({"the controller's /metrics": controller_metrics.text}, secrets)
    assert_no_leak(seen.answers, secrets)
    worker_saw = {
        f"request {i} the worker received": f"{r.headers!r}\n{r.body.decode()}"
        for i, r in enumerate(received)
    }
    assert_no_leak(worker_saw, [*made, *tokens])
    # An answer that made a key holds that key's secret, once, and no other.
    for name in ("team-api", "to-revoke", "to-update"):
        text = seen.made[f"the answer that made {name}"]
        assert text.count(t[name]) == 1
        assert_no_leak({f"the answer that made {name}": text}, [s for s in secrets if s.value != t[name]])
    cli_out = seen.made["the output of `vpool keys create`"]
    assert cli_out.count(t["team-cli"]) == 1
    assert_no_leak(
        {"the output of `vpool keys create`": cli_out}, [s for s in secrets if s.value != t["team-cli"]]
    )
