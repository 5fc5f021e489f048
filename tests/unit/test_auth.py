"""Bearer-key checks: who gets in, and what the others are told."""

from __future__ import annotations

import pytest

from vpool.auth import BearerKeys
from vpool.errors import AuthenticationFailed


def test_no_keys_configured_lets_every_request_in() -> None:
    keys = BearerKeys([])
    assert not keys.enabled
    for header in (None, "", "Bearer anything", "garbage"):
        keys.check(header)


def test_blank_keys_do_not_count_as_keys() -> None:
    keys = BearerKeys(["", ""])
    assert not keys.enabled
    keys.check(None)


@pytest.mark.parametrize(
    ("header", "says"),
    [
        pytest.param(None, "didn't provide an API key", id="missing"),
        pytest.param("", "didn't provide an API key", id="empty"),
        pytest.param("sk-one", "Malformed", id="no-scheme"),
        pytest.param("Basic sk-one", "Malformed", id="basic-scheme"),
        pytest.param("Bearer", "Malformed", id="no-key"),
        pytest.param("Bearer    ", "Malformed", id="blank-key"),
        pytest.param("Bearer sk-three", "Incorrect API key", id="wrong-key"),
        pytest.param("Bearer sk-on", "Incorrect API key", id="prefix-of-a-key"),
        pytest.param("Bearer sk-one2", "Incorrect API key", id="key-plus-suffix"),
    ],
)
def test_requests_without_a_known_key_are_refused_with_a_reason(header: str | None, says: str) -> None:
    keys = BearerKeys(["sk-one", "sk-two"])
    with pytest.raises(AuthenticationFailed) as caught:
        keys.check(header)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert says in caught.value.message
    assert "sk-one" not in caught.value.message and "sk-two" not in caught.value.message


@pytest.mark.parametrize("header", ["Bearer sk-one", "Bearer sk-two", "bearer sk-two", "Bearer  sk-one "])
def test_any_configured_key_is_accepted(header: str) -> None:
    BearerKeys(["sk-one", "sk-two"]).check(header)
