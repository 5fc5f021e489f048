"""Routing policies: who gets the next request, given the candidates and their load."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest

from vpool.config import ConfigError, RoutingName, load_settings
from vpool.gateway.routing import (
    LeastOutstanding,
    PowerOfTwoChoices,
    PrefixAffinity,
    RoundRobin,
    RoutingPolicy,
    make_policy,
)
from vpool.registry.records import WorkerLoad, WorkerRecord, WorkerState

DRAWS = 6000


def worker(worker_id: str, waiting: int = 0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        url=f"http://127.0.0.1/{worker_id}",
        models=["m"],
        state=WorkerState.READY,
        load=WorkerLoad(waiting=waiting),
    )


def shares(
    policy: RoutingPolicy, candidates: list[WorkerRecord], inflight: dict[str, int]
) -> dict[str, float]:
    """Fraction of DRAWS each worker gets with the load held still."""
    counts = Counter(policy.choose(candidates, inflight).worker_id for _ in range(DRAWS))
    return {w.worker_id: counts[w.worker_id] / DRAWS for w in candidates}


# --- least outstanding ---------------------------------------------------------------------------


def test_least_outstanding_picks_the_fewest_in_flight_plus_queued() -> None:
    fleet = [worker("a", waiting=1), worker("b", waiting=0), worker("c", waiting=5)]
    # a: 0 + 1, b: 3 + 0, c: 0 + 5
    assert LeastOutstanding().choose(fleet, {"b": 3}).worker_id == "a"


def test_least_outstanding_never_sends_to_a_busier_worker() -> None:
    fleet = [worker("busy", waiting=100), worker("idle-1"), worker("idle-2")]
    got = shares(LeastOutstanding(random.Random(1)), fleet, {"idle-1": 2, "idle-2": 2})
    assert got["busy"] == 0


def test_least_outstanding_spreads_ties_evenly_over_every_tied_worker() -> None:
    fleet = [worker("a"), worker("b"), worker("busy", waiting=1), worker("c")]
    got = shares(LeastOutstanding(random.Random(2)), fleet, {})
    assert got["busy"] == 0
    for name in "abc":
        assert got[name] == pytest.approx(1 / 3, abs=0.03)


# --- power of two choices ------------------------------------------------------------------------


def test_power_of_two_favours_the_less_loaded_in_proportion_to_rank() -> None:
    # Four workers with distinct loads: the k-th least loaded wins the pairs it shares with
    # a busier one, (n - 1 - k) of the 6 pairs: 3/6, 2/6, 1/6, 0.
    fleet = [worker("w3", waiting=3), worker("w0"), worker("w2", waiting=2), worker("w1", waiting=1)]
    got = shares(PowerOfTwoChoices(random.Random(3)), fleet, {})
    assert got["w0"] == pytest.approx(3 / 6, abs=0.03)
    assert got["w1"] == pytest.approx(2 / 6, abs=0.03)
    assert got["w2"] == pytest.approx(1 / 6, abs=0.03)
    assert got["w3"] == 0


def test_power_of_two_compares_two_distinct_workers() -> None:
    # Were a worker ever drawn twice, the busy one would sometimes be compared with itself.
    fleet = [worker("busy"), worker("idle")]
    got = shares(PowerOfTwoChoices(random.Random(4)), fleet, {"busy": 7})
    assert got == {"busy": 0, "idle": 1}


def test_power_of_two_counts_gateway_in_flight_and_worker_queue_alike() -> None:
    fleet = [worker("queued", waiting=4), worker("inflight")]
    policy = PowerOfTwoChoices(random.Random(5))
    assert {policy.choose(fleet, {"inflight": 3}).worker_id for _ in range(50)} == {"inflight"}
    assert {policy.choose(fleet, {"inflight": 5}).worker_id for _ in range(50)} == {"queued"}


def test_power_of_two_spreads_ties_evenly() -> None:
    fleet = [worker("a"), worker("b"), worker("c")]
    got = shares(PowerOfTwoChoices(random.Random(6)), fleet, {})
    for name in "abc":
        assert got[name] == pytest.approx(1 / 3, abs=0.03)


def test_power_of_two_with_one_candidate_takes_it() -> None:
    only = worker("only", waiting=50)
    assert PowerOfTwoChoices().choose([only], {"only": 9}) is only


# --- round robin ---------------------------------------------------------------------------------


def picks(policy: RoutingPolicy, candidates: list[WorkerRecord], count: int) -> list[str]:
    return [policy.choose(candidates, {}).worker_id for _ in range(count)]


def test_round_robin_cycles_through_the_candidates_whatever_their_load() -> None:
    fleet = [worker("a", waiting=50), worker("b"), worker("c")]
    policy = RoundRobin()
    got = [policy.choose(fleet, {"b": 9}).worker_id for _ in range(7)]
    assert got == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_gives_a_new_worker_the_next_turn_and_keeps_the_cycle() -> None:
    policy = RoundRobin()
    assert picks(policy, [worker("a"), worker("b")], 3) == ["a", "b", "a"]
    grown = [worker("a"), worker("b"), worker("c")]
    assert picks(policy, grown, 6) == ["c", "b", "a", "c", "b", "a"]


def test_round_robin_leaves_no_gap_when_a_worker_goes() -> None:
    policy = RoundRobin()
    assert picks(policy, [worker("a"), worker("b"), worker("c")], 2) == ["a", "b"]
    assert picks(policy, [worker("a"), worker("c")], 4) == ["c", "a", "c", "a"]


def test_round_robin_follows_workers_not_list_positions() -> None:
    # A fleet refresh may list the same workers in another order, as fresh records.
    policy = RoundRobin()
    assert picks(policy, [worker("a"), worker("b"), worker("c")], 2) == ["a", "b"]
    assert picks(policy, [worker("c"), worker("b"), worker("a")], 3) == ["c", "a", "b"]


def test_round_robin_retry_without_the_failed_worker_takes_the_next_in_turn() -> None:
    fleet = [worker("a"), worker("b"), worker("c")]
    policy = RoundRobin()
    assert picks(policy, fleet, 1) == ["a"]
    failed = policy.choose(fleet, {})
    assert failed.worker_id == "b"
    assert policy.choose([w for w in fleet if w is not failed], {}).worker_id == "c"
    assert picks(policy, fleet, 3) == ["a", "b", "c"]


def test_round_robin_spreads_evenly_over_each_models_own_workers() -> None:
    policy = RoundRobin()
    chat = [worker("chat-1"), worker("chat-2")]
    embed = [worker("embed-1"), worker("embed-2"), worker("embed-3")]
    got = Counter(policy.choose(chat if i % 3 else embed, {}).worker_id for i in range(600))
    assert got == {"chat-1": 200, "chat-2": 200, "embed-1": 67, "embed-2": 67, "embed-3": 66}


# --- choosing a policy by name -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("least_outstanding", LeastOutstanding),
        ("power_of_two", PowerOfTwoChoices),
        ("prefix", PrefixAffinity),
        ("round_robin", RoundRobin),
    ],
)
def test_make_policy_builds_the_named_policy(name: str, kind: type) -> None:
    assert isinstance(make_policy(name), kind)


def test_make_policy_knows_every_name_the_configuration_accepts() -> None:
    for name in get_args(RoutingName):
        make_policy(name)


def test_make_policy_rejects_an_unknown_name_and_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown routing policy `fastest`") as info:
        make_policy("fastest")
    assert "least_outstanding, power_of_two, prefix, round_robin" in str(info.value)


def test_each_policy_instance_keeps_its_own_state() -> None:
    fleet = [worker("a"), worker("b")]
    first, second = make_policy("round_robin"), make_policy("round_robin")
    assert picks(first, fleet, 1) == picks(second, fleet, 1) == ["a"]


# --- configuration -------------------------------------------------------------------------------


@pytest.fixture
def no_vpool_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("VPOOL_GATEWAY__ROUTING", raising=False)
    return monkeypatch


def test_routing_defaults_to_least_outstanding(no_vpool_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.gateway.routing == "least_outstanding"
    assert isinstance(make_policy(settings.gateway.routing), LeastOutstanding)


def test_environment_variable_selects_the_policy(no_vpool_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vpool.yaml"
    config.write_text("gateway: {routing: power_of_two}\n")
    assert load_settings(config).gateway.routing == "power_of_two"
    no_vpool_env.setenv("VPOOL_GATEWAY__ROUTING", "round_robin")
    settings = load_settings(config)
    assert settings.gateway.routing == "round_robin"
    assert isinstance(make_policy(settings.gateway.routing), RoundRobin)


def test_unknown_policy_in_the_environment_fails_at_start_naming_the_field(
    no_vpool_env: pytest.MonkeyPatch,
) -> None:
    no_vpool_env.setenv("VPOOL_GATEWAY__ROUTING", "random")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "gateway.routing" in str(info.value)
