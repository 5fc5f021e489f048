"""Which worker holds a stored response, learned from the answers the gateway relays."""

from __future__ import annotations

import orjson

from vpool.gateway.response_owners import ResponseOwners
from vpool.gateway.upstream import UpstreamPool


def _owners(max_remembered: int = 100) -> ResponseOwners:
    return ResponseOwners(UpstreamPool(connect_timeout_s=1.0), max_remembered=max_remembered)


def _event(kind: str, response: object) -> bytes:
    return (
        b"event: "
        + kind.encode()
        + b"\ndata: "
        + orjson.dumps({"type": kind, "response": response})
        + b"\n\n"
    )


def test_a_streams_response_created_event_names_the_owner() -> None:
    owners = _owners()
    owners.learn_from_events(_event("response.created", {"id": "resp_1", "status": "in_progress"}), "w1")
    # SSE allows `data:` without the space.
    owners.learn_from_events(b'data:{"type":"response.created","response":{"id":"resp_9"}}\n\n', "w9")
    assert (owners.owner("resp_1"), owners.owner("resp_9")) == ("w1", "w9")
    assert len(owners) == 2


def test_a_malformed_event_is_skipped_and_the_next_one_read() -> None:
    owners = _owners()
    broken = b"data: {response.created, not json\n\n"
    owners.learn_from_events(broken + _event("response.created", {"id": "resp_2"}), "w2")
    assert owners.owner("resp_2") == "w2"


def test_only_the_created_event_counts_and_only_a_string_id() -> None:
    owners = _owners()
    # An event that merely mentions response.created in its text, an id that is no string:
    data = (
        b"data: " + orjson.dumps({"type": "response.in_progress", "response": {"id": "resp_x"}}) + b"\n\n"
        + b": comment response.created\n\n"
        + _event("response.created", {"id": 7})
        + _event("response.created", ["resp_list"])
        + b'data: ["response.created"]\n\n'
    )  # fmt: skip
    owners.learn_from_events(data, "w3")
    assert len(owners) == 0


def test_the_first_created_event_is_the_one_remembered() -> None:
    owners = _owners()
    data = _event("response.created", {"id": "resp_a"}) + _event("response.created", {"id": "resp_b"})
    owners.learn_from_events(data, "w4")
    assert (owners.owner("resp_a"), owners.owner("resp_b")) == ("w4", None)


def test_a_whole_answer_names_its_owner_and_a_broken_one_nothing() -> None:
    owners = _owners()
    owners.learn_from_body(orjson.dumps({"id": "resp_3", "object": "response"}), "w5")
    owners.learn_from_body(b"{not json", "w6")
    owners.learn_from_body(orjson.dumps({"id": 3}), "w6")
    assert owners.owner("resp_3") == "w5"
    assert len(owners) == 1


def test_the_table_is_bounded_and_drops_the_least_recently_named_first() -> None:
    owners = _owners(max_remembered=2)
    owners.remember("a", "w1")
    owners.remember("b", "w1")
    owners.remember("a", "w2")  # named again: now the newest
    owners.remember("c", "w1")
    assert len(owners) == 2
    assert (owners.owner("a"), owners.owner("b"), owners.owner("c")) == ("w2", None, "w1")
