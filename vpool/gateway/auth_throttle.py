"""Slow down key guessing: an address that keeps presenting wrong keys is refused for a while.

After `max_failures` failed authentications from one address within `window_s`, its next
failures answer 429 (with `Retry-After`) instead of 401 until the window ends; a right key
still gets in (see vpool/gateway/tenants.py). Memory is bounded:
at most `max_addresses` addresses are remembered, the oldest forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from vpool.errors import VpoolError


class TooManyFailedAuthentications(VpoolError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "too_many_failed_authentications"


class AuthThrottle:
    def __init__(self, max_failures: int = 10, window_s: float = 60.0, max_addresses: int = 10_000) -> None:
        self._max_failures = max_failures
        self._window_s = window_s
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (since, count)

    def check(self, address: str) -> None:
        """Raise TooManyFailedAuthentications while `address` is refused."""
        seen = self._failures.get(address)
        if seen is None:
            return
        since, count = seen
        left = since + self._window_s - time.monotonic()
        if left <= 0:
            del self._failures[address]
        elif count >= self._max_failures:
            raise TooManyFailedAuthentications(
                "Too many requests with a wrong API key from this address: try again later.",
                headers={"Retry-After": str(max(1, math.ceil(left)))},
            )

    def failed(self, address: str) -> None:
        now = time.monotonic()
        since, count = self._failures.pop(address, (now, 0))
        if now - since >= self._window_s:
            since, count = now, 0
        self._failures[address] = (since, count + 1)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
