"""Bearer-key checks, in constant time: the one place keys are compared.

Keys are kept as SHA-256 digests so that the plain keys do not linger in memory dumps
and every comparison costs the same whatever the key's length.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from vpool.errors import AuthenticationFailed, InvalidRequest


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class BearerKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationFailed unless the header carries a known key (or none is set)."""
        if not self._digests:
            return
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`."
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed("Malformed Authorization header: use `Bearer YOUR_KEY`.")
        presented = _digest(key.strip())
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise AuthenticationFailed("Incorrect API key provided.")


def single_authorization(values: Sequence[str]) -> str | None:
    """The one Authorization header a request carries; 400 when it carries several.

    With two, a proxy in front and the gateway may each check a different one: refuse to guess.
    """
    if len(values) > 1:
        raise duplicate_authorization()
    return values[0] if values else None


def duplicate_authorization() -> InvalidRequest:
    return InvalidRequest("Send one Authorization header, not several.", code="duplicate_header")
