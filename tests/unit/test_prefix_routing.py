"""The `prefix` routing policy: the prompt's key, rendezvous hashing, the load bound."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.stub_worker import StubError
from tests.unit.conftest import MODEL, GatewayFactory, StubFactory
from vpool.cli import app
from vpool.config import (
    ConfigError,
    GatewaySettings,
    ModelSpec,
    PrefixRoutingSettings,
    Settings,
    load_settings,
)
from vpool.gateway.fleet import Fleet
from vpool.gateway.prefix import PrefixKeying, chat_layout, completion_layout
from vpool.gateway.request_body import parse_openai_request
from vpool.gateway.routing import (
    LeastOutstanding,
    PrefixAffinity,
    make_policy,
    model_policies,
    rendezvous_weight,
)
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import WorkerLoad, WorkerRecord, WorkerState

# Short blocks so that tests can write prompts of a few blocks: 2 blocks of 32 characters.
KEYING = PrefixKeying(block_chars=32, prefix_blocks=2)
SYSTEM = "You are a careful assistant who answers in French. " * 2  # 102 characters: 3 blocks
OTHER_SYSTEM = "You are a terse assistant who answers in Latin only. " * 2


def chat(*messages: tuple[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in messages], **fields}


def worker(worker_id: str, waiting: int = 0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        url=f"http://127.0.0.1/{worker_id}",
        models=[MODEL],
        state=WorkerState.READY,
        load=WorkerLoad(waiting=waiting),
    )


def prefix_policy(epsilon: float = 0.25) -> PrefixAffinity:
    return PrefixAffinity(KEYING, epsilon, random.Random(1))


# --- the prompt's layout and key ---------------------------------------------------------------


def test_chat_layout_has_every_message_in_order_role_then_content_text_parts_included() -> None:
    data = chat(
        ("system", "be brief"),
        ("user", [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": "x"}}]),
        ("assistant", "a cat"),
        ("user", "and now?"),
    )
    text = chat_layout(data, 10_000)
    assert text is not None
    positions = [text.index(part) for part in ("system", "be brief", "user", "look at", "<image_url>")]
    assert positions == sorted(positions)
    assert text.index("a cat") < text.index("and now?")


def test_chat_layout_tells_apart_where_one_message_ends_and_the_next_begins() -> None:
    one = chat_layout(chat(("user", "ab"), ("user", "c")), 100)
    other = chat_layout(chat(("user", "a"), ("user", "bc")), 100)
    assert one != other


def test_chat_layout_includes_the_tools_which_templates_put_ahead_of_the_turns() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert "get_weather" in (chat_layout(chat(("user", "hi"), tools=tools), 1000) or "")


def test_layouts_stop_at_the_limit_whatever_the_prompt_size() -> None:
    huge = chat(*[("user", "x" * 10_000)] * 100)
    assert len(chat_layout(huge, 64) or "") == 64
    assert completion_layout({"prompt": "y" * 1_000_000}, 64) == "y" * 64
    assert completion_layout({"prompt": list(range(1_000_000))}, 64) == ",".join(map(str, range(30)))[:64]


def test_completion_layout_takes_the_string_the_token_ids_or_the_first_of_a_batch() -> None:
    assert completion_layout({"prompt": "Once upon"}, 100) == "Once upon"
    assert completion_layout({"prompt": [1, 22, 333]}, 100) == "1,22,333"
    assert completion_layout({"prompt": ["first", "second"]}, 100) == "first"
    assert completion_layout({"prompt": [[5, 6], [7]]}, 100) == "5,6"
    assert completion_layout({}, 100) is None


def test_same_system_prompt_and_different_users_share_a_key() -> None:
    alice = KEYING.key("chat", chat(("system", SYSTEM), ("user", "Bonjour, I am Alice.")))
    bob = KEYING.key("chat", chat(("system", SYSTEM), ("user", "Hello, Bob here, a question.")))
    assert alice is not None and alice == bob


def test_different_system_prompts_have_different_keys() -> None:
    first = KEYING.key("chat", chat(("system", SYSTEM), ("user", "hi")))
    second = KEYING.key("chat", chat(("system", OTHER_SYSTEM), ("user", "hi")))
    assert first is not None and second is not None and first != second


def test_a_growing_conversation_keeps_its_key() -> None:
    turns: list[tuple[str, Any]] = [
        ("system", "short"),
        ("user", "Tell me about the moon and the tides, please."),
    ]
    keys = set()
    for n in range(5):
        keys.add(KEYING.key("chat", chat(*turns)))
        turns += [("assistant", f"answer number {n} " * 5), ("user", f"and question {n}?")]
    assert len(keys) == 1 and None not in keys


BY_CONVERSATION = PrefixKeying(block_chars=32, prefix_blocks=2, by_conversation=True)


def test_by_conversation_two_users_on_one_system_prompt_get_two_keys() -> None:
    alice = BY_CONVERSATION.key("chat", chat(("system", SYSTEM), ("user", "Bonjour, I am Alice.")))
    bob = BY_CONVERSATION.key("chat", chat(("system", SYSTEM), ("user", "Hello, Bob here, a question.")))
    assert alice is not None and bob is not None and alice != bob
    # Text parts count as the string does: the same conversation, however it is sent.
    parts = [{"type": "text", "text": "Bonjour, "}, {"type": "text", "text": "I am Alice."}]
    assert BY_CONVERSATION.key("chat", chat(("system", SYSTEM), ("user", parts))) == alice


def test_by_conversation_a_growing_conversation_keeps_its_key_and_its_system_prompt_counts() -> None:
    turns: list[tuple[str, Any]] = [("system", SYSTEM), ("user", "Tell me about the moon.")]
    keys = set()
    for n in range(5):
        keys.add(BY_CONVERSATION.key("chat", chat(*turns)))
        turns += [("assistant", f"answer number {n} " * 5), ("user", f"and question {n}?")]
    assert len(keys) == 1 and None not in keys
    other = BY_CONVERSATION.key("chat", chat(("system", OTHER_SYSTEM), ("user", "Tell me about the moon.")))
    assert other not in keys


def test_by_conversation_keeps_no_key_under_one_block_and_the_blocks_key_with_no_user() -> None:
    assert BY_CONVERSATION.key("chat", chat(("user", "hi"))) is None
    system_only = chat(("system", SYSTEM))
    assert BY_CONVERSATION.key("chat", system_only) == KEYING.key("chat", system_only) is not None
    completion = {"model": MODEL, "prompt": SYSTEM}  # completions have no conversation
    assert BY_CONVERSATION.key("completions", completion) == KEYING.key("completions", completion)


def test_a_prompt_under_one_block_and_routes_without_a_prompt_have_no_key() -> None:
    assert KEYING.key("chat", chat(("user", "hi"))) is None
    assert KEYING.key("embeddings", {"model": MODEL, "input": SYSTEM}) is None
    assert KEYING.key("chat", {"model": MODEL}) is None
    assert KEYING.key("chat", None) is None
    assert KEYING.key("completions", {"model": MODEL, "prompt": SYSTEM}) is not None


def test_the_key_only_reads_prefix_blocks_blocks() -> None:
    """Past the first `prefix_blocks` blocks nothing counts: the work per request is bounded."""
    start = "z" * (KEYING.block_chars * KEYING.prefix_blocks)
    assert KEYING.key_of(start + "one ending") == KEYING.key_of(start + "another, longer ending")
    assert KEYING.key_of(start[:-1] + "y") != KEYING.key_of(start)


def test_the_key_is_the_same_in_another_process() -> None:
    """Python's own `hash()` of a string differs per process: the key must not."""
    data = chat(("system", SYSTEM), ("user", "héllo 世界"))
    script = (
        "import json, sys\n"
        "from vpool.gateway.prefix import PrefixKeying\n"
        "from vpool.gateway.routing import rendezvous_weight\n"
        "key = PrefixKeying(32, 2).key('chat', json.loads(sys.argv[1]))\n"
        "print(key, rendezvous_weight(key, 'worker-7'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(data)],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.split()
    key = KEYING.key("chat", data)
    assert key is not None
    assert out == [str(key), str(rendezvous_weight(key, "worker-7"))]


# --- rendezvous hashing ---------------------------------------------------------------------------

_RNG = random.Random(7)
KEYS = [_RNG.getrandbits(32) for _ in range(2000)]


def owners(policy: PrefixAffinity, fleet: list[WorkerRecord]) -> list[str]:
    return [policy.choose(fleet, {}, key).worker_id for key in KEYS]


def test_keys_spread_over_the_workers() -> None:
    fleet = [worker(f"w{i}") for i in range(5)]
    counts = Counter(owners(prefix_policy(), fleet))
    assert set(counts) == {w.worker_id for w in fleet}
    assert all(300 <= n <= 500 for n in counts.values()), counts  # 400 each on average


def test_a_worker_leaving_moves_only_the_keys_it_had() -> None:
    fleet = [worker(f"w{i}") for i in range(5)]
    policy = prefix_policy()
    before = owners(policy, fleet)
    after = owners(policy, [w for w in fleet if w.worker_id != "w2"])
    moved = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
    assert moved and all(before[i] == "w2" for i in moved)
    assert len(moved) == before.count("w2")


def test_a_worker_joining_takes_about_its_share_and_only_moves_keys_to_itself() -> None:
    fleet = [worker(f"w{i}") for i in range(5)]
    policy = prefix_policy()
    before = owners(policy, fleet)
    after = owners(policy, [*fleet, worker("w5")])
    moved = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
    assert all(after[i] == "w5" for i in moved)
    assert 0.12 <= len(moved) / len(KEYS) <= 0.22  # 1/6 = 0.167


def test_the_choice_does_not_depend_on_the_order_of_the_candidates() -> None:
    fleet = [worker(f"w{i}") for i in range(5)]
    policy = prefix_policy()
    assert owners(policy, fleet) == owners(policy, fleet[::-1])


# --- bounded load ---------------------------------------------------------------------------------


def rendezvous_order(key: int, fleet: list[WorkerRecord]) -> list[str]:
    return [
        w.worker_id for w in sorted(fleet, key=lambda w: rendezvous_weight(key, w.worker_id), reverse=True)
    ]


def test_a_hot_key_spills_to_its_next_rendezvous_choice_when_its_worker_is_at_the_cap() -> None:
    fleet = [worker(f"w{i}") for i in range(4)]
    key = KEYS[0]
    order = rendezvous_order(key, fleet)
    policy = prefix_policy(epsilon=0.25)
    # 8 outstanding in all: cap = ceil(1.25 * 9 / 4) = 3. The first choice has 3: full.
    inflight = {order[0]: 3, order[1]: 2, order[2]: 3, order[3]: 0}
    assert policy.choose(fleet, inflight, key).worker_id == order[1]
    inflight[order[0]] = 2  # 7 in all: cap = ceil(1.25 * 8 / 4) = 3, and it has 2
    assert policy.choose(fleet, inflight, key).worker_id == order[0]


def test_the_queue_a_worker_reports_counts_toward_the_cap() -> None:
    key = KEYS[1]
    names = rendezvous_order(key, [worker(f"w{i}") for i in range(3)])
    fleet = [worker(names[0], waiting=5), worker(names[1]), worker(names[2])]
    assert prefix_policy().choose(fleet, {}, key).worker_id == names[1]


def test_under_a_hot_key_no_worker_exceeds_the_cap_and_the_spill_follows_rendezvous_order() -> None:
    """Every request on one key, none finishing: each worker stays within (1 + ε) of the
    mean, and the key's first choices fill up before later ones get any."""
    fleet = [worker(f"w{i}") for i in range(5)]
    order = rendezvous_order(KEYS[2], fleet)
    policy = prefix_policy(epsilon=0.25)
    inflight: dict[str, int] = {}
    for total in range(200):
        chosen = policy.choose(fleet, inflight, KEYS[2]).worker_id
        inflight[chosen] = inflight.get(chosen, 0) + 1
        assert max(inflight.values()) <= math.ceil(1.25 * (total + 1) / 5)
    loads = [inflight.get(w, 0) for w in order]
    assert loads == sorted(loads, reverse=True), loads
    assert loads[0] == 50  # 1.25 x the mean of 40


def test_epsilon_sets_how_long_a_hot_key_stays_on_one_worker() -> None:
    fleet = [worker(f"w{i}") for i in range(4)]

    def workers_used(epsilon: float, requests: int) -> int:
        policy, inflight = prefix_policy(epsilon), Counter[str]()
        for _ in range(requests):
            inflight[policy.choose(fleet, inflight, KEYS[3]).worker_id] += 1
        return len(inflight)

    assert workers_used(0.1, 2) == 2  # cap ceil(1.1 * 2 / 4) = 1: the second spills
    assert workers_used(3.0, 20) == 1  # (1 + 3) / 4 = 1: no bound at all on 4 workers


# --- fallbacks ------------------------------------------------------------------------------------


def test_without_a_key_it_is_least_outstanding() -> None:
    fleet = [worker("a", waiting=2), worker("b"), worker("c", waiting=1)]
    assert prefix_policy().choose(fleet, {"b": 3}).worker_id == "c"
    assert prefix_policy().choose(fleet, {"b": 3}, None).worker_id == "c"


def test_with_one_candidate_it_takes_it_whatever_its_load() -> None:
    assert prefix_policy().choose([worker("only", waiting=50)], {}, KEYS[0]).worker_id == "only"


def test_a_retry_goes_to_the_keys_next_choice() -> None:
    """The failed worker is left out of the candidates: the key's runner-up answers."""
    fleet = [worker(f"w{i}") for i in range(4)]
    first, second, *_ = rendezvous_order(KEYS[4], fleet)
    rest = [w for w in fleet if w.worker_id != first]
    assert prefix_policy().choose(rest, {}, KEYS[4]).worker_id == second


# --- the fleet: keys made only for a policy that wants them ---------------------------------------


def fleet_of(policy: Any, **options: Any) -> Fleet:
    return Fleet(MemoryRegistry(), policy, {MODEL}, 1.0, **options)


def test_the_fleet_makes_no_key_for_the_load_only_policies() -> None:
    request = parse_openai_request(json.dumps(chat(("system", SYSTEM), ("user", "hi"))).encode())
    assert not fleet_of(LeastOutstanding()).keyed
    assert fleet_of(LeastOutstanding()).routing_key("chat", request) is None
    keyed = fleet_of(prefix_policy())
    assert keyed.keyed and keyed.routing_key("chat", request) == KEYING.key("chat", request.data)


def test_a_per_model_policy_keys_only_that_models_requests() -> None:
    fleet = fleet_of(LeastOutstanding(), model_policies={"coder": prefix_policy()})
    body = chat(("system", SYSTEM), ("user", "hi"))
    assert fleet.keyed
    assert fleet.routing_key("chat", parse_openai_request(json.dumps(body).encode())) is None
    coder = parse_openai_request(json.dumps({**body, "model": "coder"}).encode())
    assert fleet.routing_key("chat", coder) == KEYING.key("chat", coder.data)


# --- configuration and the command line -----------------------------------------------------------


def test_prefix_routing_settings_have_their_defaults_and_make_the_policy() -> None:
    g = GatewaySettings(routing="prefix")
    assert (g.prefix_routing.block_chars, g.prefix_routing.prefix_blocks, g.prefix_routing.epsilon) == (
        256,
        8,
        0.25,
    )
    policy = make_policy(g.routing, g.prefix_routing)
    assert isinstance(policy, PrefixAffinity)
    assert policy.keying == PrefixKeying(256, 8) and policy.epsilon == 0.25
    assert not g.prefix_routing.by_conversation
    on = GatewaySettings(routing="prefix", prefix_routing={"by_conversation": True})
    assert make_policy(on.routing, on.prefix_routing).keying == PrefixKeying(256, 8, True)


@pytest.mark.parametrize("epsilon", ["0", "-0.5", "many"])
def test_a_bad_epsilon_fails_at_start_naming_the_field(epsilon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPOOL_GATEWAY__PREFIX_ROUTING__EPSILON", epsilon)
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert "gateway.prefix_routing.epsilon" in str(info.value)


def test_the_config_file_sets_prefix_routing_for_all_or_for_one_model_and_its_aliases(tmp_path: Path) -> None:
    config = tmp_path / "vpool.yaml"
    config.write_text(
        "gateway:\n"
        "  routing: prefix\n"
        "  prefix_routing: {block_chars: 128, prefix_blocks: 4, epsilon: 0.5}\n"
        "  model_routing: {coder: prefix, embedder: round_robin}\n"
    )
    settings = load_settings(config)
    assert settings.gateway.routing == "prefix"
    assert settings.gateway.prefix_routing == PrefixRoutingSettings(
        block_chars=128, prefix_blocks=4, epsilon=0.5
    )
    aliased = Settings(
        gateway=settings.gateway,
        models=[ModelSpec(name="coder", model="builtin:tiny-chat", aliases=["coder-latest"])],
    )
    policies = model_policies(aliased)
    assert set(policies) == {"coder", "coder-latest", "embedder"}
    assert policies["coder"] is policies["coder-latest"]
    assert isinstance(policies["coder"], PrefixAffinity) and policies["coder"].keying == PrefixKeying(128, 4)


def test_an_unknown_policy_for_one_model_fails_at_start(tmp_path: Path) -> None:
    config = tmp_path / "vpool.yaml"
    config.write_text("gateway:\n  model_routing: {coder: nearest}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "gateway.model_routing.coder" in str(info.value)


def test_the_command_line_accepts_routing_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vpool gateway --routing prefix` starts a gateway so configured (a stand-in records
    the settings instead of serving)."""
    started: list[Settings] = []

    def stand_in(settings: Settings) -> int:
        started.append(settings)
        return 0

    monkeypatch.setattr("vpool.gateway.processes.serve_gateway", stand_in)
    args = ["gateway", "--routing", "prefix", "--redis-url", "redis://127.0.0.1:1/0", "--port", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [s.gateway.routing for s in started] == ["prefix"]


def test_the_command_line_refuses_an_unknown_policy_and_a_bad_epsilon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unknown = CliRunner().invoke(app, ["gateway", "--routing", "nearest"])
    assert unknown.exit_code == 2 and "nearest" in unknown.output
    monkeypatch.setenv("VPOOL_GATEWAY__PREFIX_ROUTING__EPSILON", "0")
    bad = CliRunner().invoke(app, ["gateway", "--routing", "prefix", "--redis-url", "redis://127.0.0.1:1/0"])
    assert bad.exit_code == 2
    assert "gateway.prefix_routing.epsilon" in bad.output


# --- through a real gateway -----------------------------------------------------------------------


def post_chat(http: httpx.Client, url: str, system: str, user: str) -> str:
    body = chat(("system", system), ("user", user))
    resp = http.post(url + "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-vpool-worker"]


def test_chats_sharing_a_system_prompt_land_on_one_worker_and_two_gateways_agree(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    prefix = PrefixRoutingSettings(block_chars=32, prefix_blocks=2)
    gateways = [start_gateway(routing="prefix", prefix_routing=prefix) for _ in range(2)]
    stubs = [start_stub(f"s{i}") for i in range(4)]
    for gw in gateways:
        for stub in stubs:
            gw.add_worker(stub, worker_id=stub.name)
    systems = [f"System prompt number {i}: you are a helpful assistant." for i in range(12)]
    chosen: dict[str, set[str]] = {s: set() for s in systems}
    for n in range(3):
        for gw in gateways:
            for system in systems:
                chosen[system].add(post_chat(http, gw.url, system, f"user {n} asks something"))
    # Sequential requests: nothing is outstanding, so only the key decides.
    assert all(len(workers) == 1 for workers in chosen.values()), chosen
    assert len({next(iter(w)) for w in chosen.values()}) >= 3  # 12 prefixes over 4 workers
    # A short prompt (under one block) has no key: it goes wherever the load says.
    spread = {post_chat(http, gateways[0].url, "hi", "") for _ in range(30)}
    assert len(spread) >= 2


def test_a_request_its_worker_refuses_is_retried_on_its_keys_next_choice(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(
        routing="prefix", prefix_routing=PrefixRoutingSettings(block_chars=32, prefix_blocks=2)
    )
    stubs = {name: start_stub(name) for name in ("s0", "s1", "s2", "s3")}
    for name, stub in stubs.items():
        gw.add_worker(stub, worker_id=name)
    body = chat(("system", SYSTEM), ("user", "hi"))
    key = KEYING.key("chat", body)
    assert key is not None
    first, second, *_ = rendezvous_order(key, [worker(name) for name in stubs])
    assert post_chat(http, gw.url, SYSTEM, "hi") == first
    stubs[first].error = StubError.vllm_detail(503, "The server is shutting down.")
    assert post_chat(http, gw.url, SYSTEM, "hi") == second
    assert stubs[first].count == 2 and stubs[second].count == 1


def test_the_remembered_worker_hashes_stay_bounded_and_choices_do_not_change() -> None:
    fleet = [worker(f"w{i}") for i in range(5)]
    small = prefix_policy()
    small._MAX_REMEMBERED = 3  # fewer than the workers: dropped again and again
    loads = {"w0": 4, "w1": 4, "w2": 4}  # a spill on some keys too
    assert [small.choose(fleet, loads, k).worker_id for k in KEYS[:300]] == [
        prefix_policy().choose(fleet, loads, k).worker_id for k in KEYS[:300]
    ]
    assert len(small._id_hashes) <= 3
