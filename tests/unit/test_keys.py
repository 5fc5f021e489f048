"""API keys as data: both stores keep only digests and outlive a restart; the gateways take a
key made or revoked through the controller's admin API within a second; a key limited to
some models sees only those; the keys last read keep working while the store is away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.unit.conftest import GatewayHandle, Servers, assert_openai_error
from vpool.config import ControllerSettings, GatewaySettings, KeyConfig
from vpool.controller.app import create_controller_app
from vpool.registry.key_stores import RedisKeyStore, SqliteKeyStore, config_keys
from vpool.registry.keys import ApiKey, KeyStore, hash_secret, new_secret, with_secret
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import RegistryUnavailable

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN = "admin-token-for-tests"
# A change reaches the gateway on its next read of the store (every 0.1 s here): generous
# bounds, since a loaded machine is slow; how fast it is belongs to the README, not a test.
PROPAGATION_S = 5.0
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def redis_store() -> AsyncIterator[tuple[RedisKeyStore, Redis, str]]:
    prefix = f"vpool-keys-test-{uuid.uuid4().hex[:8]}"
    raw = Redis.from_url(REDIS_URL, decode_responses=True)
    store = RedisKeyStore(Redis.from_url(REDIS_URL, decode_responses=True), prefix, 2.0)
    try:
        yield store, raw, prefix
    finally:
        await store.close()
        found = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
        if found:
            await raw.delete(*found)
        await raw.aclose()


@asynccontextmanager
async def sqlite_store(path: Path) -> AsyncIterator[SqliteKeyStore]:
    store = SqliteKeyStore(path)
    try:
        yield store
    finally:
        await store.close()


def _made(name: str = "team-a", **fields: object) -> tuple[ApiKey, str]:
    secret = new_secret()
    return with_secret(ApiKey(name=name, **fields), secret), secret  # type: ignore[arg-type]


async def _contract(store: KeyStore) -> None:
    assert await store.list() == []
    start = await store.version()
    key, _ = _made(models=["tiny-chat"], rpm=60)
    await store.put(key)
    assert await store.version() == start + 1
    assert await store.get(key.key_id) == key
    await store.touch({key.key_id: 1234.5})
    assert await store.version() == start + 1  # a use is not a change
    changed = key.model_copy(update={"rpm": 120})
    await store.put(changed)
    got = await store.get(key.key_id)
    assert got is not None and got.rpm == 120 and got.last_used_at == 1234.5  # the edit kept the use
    other, _ = _made("team-b")
    await store.put(other)
    assert [k.key_id for k in await store.list()] == [key.key_id, other.key_id]
    assert await store.get("key_nope") is None
    assert await store.version() == start + 3


async def test_the_redis_store_keeps_the_contract_and_no_secret() -> None:
    async with redis_store() as (store, raw, prefix):
        await _contract(store)
        key, secret = _made("with-secret")
        await store.put(key)
        dumped = []
        async for name in raw.scan_iter(match=f"{prefix}:*"):
            kind = await raw.type(name)
            dumped.append(str(await raw.hgetall(name) if kind == "hash" else await raw.get(name)))
        assert not any(secret in d for d in dumped)
        assert any(hash_secret(secret) in d for d in dumped)


async def test_the_sqlite_store_keeps_the_contract_no_secret_and_outlives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    key, secret = _made("survivor", tpm=1000)
    async with sqlite_store(path) as store:
        await _contract(store)
        await store.put(key)
    async with sqlite_store(path) as reopened:
        assert await reopened.get(key.key_id) == key
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # noqa: ASYNC240
    assert secret.encode() not in raw and hash_secret(secret).encode() in raw


async def test_a_redis_store_that_is_away_says_so_within_its_timeout() -> None:
    store = RedisKeyStore(Redis.from_url("redis://127.0.0.1:1/0"), "vpool", 0.5)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable):
        await store.list()
    assert time.monotonic() - started < 5  # bounded: never a hang
    await store.close()


def test_secrets_are_long_random_and_recognisable() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith("vp-") and len(secret) >= 3 + 32  # 192 bits in base64url
    key, secret = _made()
    assert key.prefix == secret[:11] and key.secret_hash == hash_secret(secret)
    assert "secret_hash" not in key.public()


def test_config_file_keys_become_records_with_their_fields() -> None:
    settings = GatewaySettings(
        api_keys=["sk-plain"], keys=[KeyConfig(key="sk-named", name="ci", models=["m"], rpm=5)]
    )
    plain, named = config_keys(settings)
    assert plain.models is None and plain.secret_hash == hash_secret("sk-plain")
    assert (named.name, named.models, named.rpm, named.key_id) == ("ci", ["m"], 5, "config-1")


# --- through the controller's admin API and a gateway -------------------------------------


class FlakyStore:
    """A real SQLite store that can be made to fail as a store that went away would."""

    def __init__(self, path: Path) -> None:
        self.inner = SqliteKeyStore(path)
        self.away = False

    def __getattr__(self, name: str) -> object:
        method = getattr(self.inner, name)
        if name == "close":
            return method

        async def call(*args: object) -> object:
            if self.away:
                raise RegistryUnavailable("the key store is away (test)")
            return await method(*args)

        return call


@pytest.fixture
def fleet(servers: Servers, start_stub, tmp_path: Path) -> Iterator[tuple[str, GatewayHandle, FlakyStore]]:
    """A controller and a gateway over one key store file, as in `vpool up`; a stub worker."""
    path = tmp_path / "keys.sqlite3"
    controller = servers.serve(
        create_controller_app(
            ControllerSettings(admin_token=ADMIN), MemoryRegistry(), key_store=SqliteKeyStore(path)
        )
    )
    flaky = FlakyStore(path)
    gateway = servers.gateway(key_store=flaky, keys_refresh_interval_s=0.1)  # type: ignore[arg-type]
    gateway.add_worker(start_stub("a"), ["tiny-chat"])
    gateway.add_worker(start_stub("b"), ["other-model"])
    yield controller.url, gateway, flaky


def _admin(controller: str, method: str, path: str = "", **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, f"{controller}/admin/v1/keys{path}", headers=headers, timeout=5, **kwargs)  # type: ignore[arg-type]


def _within(seconds: float, check) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def test_a_key_made_revoked_or_expired_through_the_admin_api_takes_effect_on_every_gateway(fleet) -> None:
    controller, gateway, _ = fleet
    made = _admin(controller, "POST", json={"name": "team-a"})
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["secret"], made.json()["key"]["key_id"]
    assert "secret_hash" not in made.json()["key"] and made.json()["key"]["prefix"] == secret[:11]
    auth = {"Authorization": f"Bearer {secret}"}

    # Once the gateway has read a key, a request without one is refused; this key gets in.
    _within(
        PROPAGATION_S, lambda: httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 401
    )
    assert_openai_error(httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT), 401)
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    listed = _admin(controller, "GET").json()["data"]
    assert [k["key_id"] for k in listed] == [key_id] and secret not in str(listed)
    _within(PROPAGATION_S, lambda: _admin(controller, "GET", f"/{key_id}").json()["last_used_at"] is not None)

    assert _admin(controller, "DELETE", f"/{key_id}").json()["revoked_at"] is not None
    _within(
        PROPAGATION_S,
        lambda: httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 401,
    )
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth)
    assert assert_openai_error(refused, 401)["code"] == "key_revoked"
    again = _admin(controller, "PATCH", f"/{key_id}", json={"rpm": 5})
    assert assert_openai_error(again, 400)["code"] == "key_revoked"

    soon = _admin(controller, "POST", json={"name": "brief", "expires_at": time.time() + 3}).json()
    brief = {"Authorization": f"Bearer {soon['secret']}"}
    _within(PROPAGATION_S, lambda: httpx.get(f"{gateway.url}/v1/models", headers=brief).status_code == 200)
    _within(
        3 + PROPAGATION_S, lambda: httpx.get(f"{gateway.url}/v1/models", headers=brief).status_code == 401
    )
    assert (
        assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers=brief), 401)["code"]
        == "key_expired"
    )


def test_a_key_limited_to_some_models_sees_only_those(fleet) -> None:
    controller, gateway, _ = fleet
    made = _admin(controller, "POST", json={"name": "narrow", "models": ["tiny-chat"]}).json()
    auth = {"Authorization": f"Bearer {made['secret']}"}
    _within(PROPAGATION_S, lambda: httpx.get(f"{gateway.url}/v1/models").status_code == 401)
    listed = httpx.get(f"{gateway.url}/v1/models", headers=auth).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-chat"]
    assert httpx.get(f"{gateway.url}/v1/models/tiny-chat", headers=auth).status_code == 200
    hidden = httpx.get(f"{gateway.url}/v1/models/other-model", headers=auth)
    assert assert_openai_error(hidden, 404)["code"] == "model_not_found"
    refused = httpx.post(
        f"{gateway.url}/v1/chat/completions", json={**CHAT, "model": "other-model"}, headers=auth
    )
    error = assert_openai_error(refused, 404)
    assert error["code"] == "model_not_found" and "do not have access to it" in error["message"]
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    # Widened: every model.
    assert (
        _admin(controller, "PATCH", f"/{made['key']['key_id']}", json={"models": None}).json()["models"]
        is None
    )
    _within(
        PROPAGATION_S, lambda: len(httpx.get(f"{gateway.url}/v1/models", headers=auth).json()["data"]) == 2
    )


def test_the_keys_last_read_keep_working_while_the_store_is_away(fleet) -> None:
    controller, gateway, flaky = fleet
    made = _admin(controller, "POST", json={"name": "steady"}).json()
    auth = {"Authorization": f"Bearer {made['secret']}"}
    # Until the gateway has read a key it is open to all: wait for it to refuse the keyless.
    _within(
        PROPAGATION_S, lambda: httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 401
    )
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    flaky.away = True
    _within(PROPAGATION_S, lambda: not gateway.state.keys.store_ok)
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 401
    flaky.away = False
    _within(PROPAGATION_S, lambda: gateway.state.keys.store_ok)


def test_the_admin_api_refuses_client_keys_and_bad_input_and_says_when_the_store_is_away(
    servers: Servers, tmp_path: Path
) -> None:
    flaky = FlakyStore(tmp_path / "keys.sqlite3")
    controller = servers.serve(
        create_controller_app(ControllerSettings(admin_token=ADMIN), MemoryRegistry(), key_store=flaky)  # type: ignore[arg-type]
    ).url
    made = _admin(controller, "POST", json={"name": "client"}).json()
    as_client = httpx.get(
        f"{controller}/admin/v1/keys", headers={"Authorization": f"Bearer {made['secret']}"}
    )
    assert_openai_error(as_client, 401)
    assert_openai_error(httpx.get(f"{controller}/admin/v1/keys"), 401)
    assert assert_openai_error(_admin(controller, "GET", "/key_nope"), 404)["code"] == "key_not_found"
    assert_openai_error(_admin(controller, "POST", json={"name": ""}), 400)
    assert_openai_error(_admin(controller, "POST", json={"name": "x", "rpm": 0}), 400)
    assert_openai_error(_admin(controller, "POST", json={"name": "x", "bogus": 1}), 400)
    assert_openai_error(
        _admin(controller, "POST", json={"name": "x", "models": []}), 400
    )  # could use nothing
    never = _admin(controller, "POST", content=b'{"name": "x", "expires_at": NaN}')
    assert_openai_error(never, 400)  # never a key that silently never expires
    past = _admin(controller, "POST", json={"name": "x", "expires_at": time.time() - 10})
    assert assert_openai_error(past, 400)["param"] == "expires_at"
    assert_openai_error(_admin(controller, "PATCH", f"/{made['key']['key_id']}", json={"name": None}), 400)
    assert len(_admin(controller, "GET").json()["data"]) == 1  # nothing half made
    flaky.away = True
    down = _admin(controller, "POST", json={"name": "later"})
    assert assert_openai_error(down, 503)["code"] == "key_store_unavailable"
    flaky.away = False
    assert len(_admin(controller, "GET").json()["data"]) == 1


async def test_a_gateway_with_no_key_anywhere_is_open_and_config_keys_still_work(tmp_path: Path) -> None:
    from vpool.gateway.tenants import KeyRing

    async with sqlite_store(tmp_path / "k.sqlite3") as store:
        ring = KeyRing([], store)
        await ring.refresh()
        assert not ring.enabled and ring.check(None) is None
        ring = KeyRing(config_keys(GatewaySettings(api_keys=["sk-config"])), store)
        await ring.refresh()
        key = ring.check("Bearer sk-config")
        assert key is not None and key.key_id == "config-0"
        await asyncio.sleep(0)


def test_an_address_that_keeps_failing_is_refused_and_right_keys_still_get_in(
    start_gateway, start_stub
) -> None:
    gateway = start_gateway(api_keys=["sk-right"], max_failed_auth_per_minute=10)
    gateway.add_worker(start_stub("a"), ["tiny-chat"])
    wrong = {"Authorization": "Bearer sk-wrong"}
    answers = [httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=wrong) for _ in range(12)]
    assert [a.status_code for a in answers] == [401] * 10 + [429] * 2
    refused = assert_openai_error(answers[-1], 429)
    assert refused["type"] == "rate_limit_exceeded" and int(answers[-1].headers["retry-after"]) >= 1
    assert httpx.get(f"{gateway.url}/v1/models", headers=wrong).status_code == 429
    right = {"Authorization": "Bearer sk-right"}
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=right).status_code == 200


def test_the_failed_authentication_limit_can_be_turned_off(start_gateway) -> None:
    gateway = start_gateway(api_keys=["sk-right"], max_failed_auth_per_minute=0)
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert {httpx.get(f"{gateway.url}/v1/models", headers=wrong).status_code for _ in range(25)} == {401}


def test_the_throttle_forgets_after_its_window_and_remembers_a_bounded_number_of_addresses() -> None:
    from vpool.gateway.auth_throttle import AuthThrottle, TooManyFailedAuthentications

    throttle = AuthThrottle(max_failures=2, window_s=0.2, max_addresses=3)
    throttle.failed("a")
    throttle.check("a")
    throttle.failed("a")
    with pytest.raises(TooManyFailedAuthentications):
        throttle.check("a")
    throttle.check("b")  # another address is not refused
    time.sleep(0.25)
    throttle.check("a")  # the window ended
    for address in ("a", "a", "b", "c", "d"):
        throttle.failed(address)
    throttle.check("a")  # the oldest, forgotten when a fourth came
    assert len(throttle._failures) == 3
