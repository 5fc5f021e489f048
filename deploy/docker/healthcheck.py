"""Docker HEALTHCHECK for vpool's images: exit 0 when URL answers 2xx, else 1.

Slim images have no curl, so this is plain Python with urllib. `--token-env NAME` sends the
variable NAME (when set and not empty) as a bearer token: the controller's `/health` needs
the registration token once one is configured.

    python healthcheck.py http://127.0.0.1:8001/health --token-env VPOOL_REGISTRATION_TOKEN
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--token-env"):
        print("usage: healthcheck.py URL [--token-env NAME]", file=sys.stderr)
        return 2
    request = urllib.request.Request(argv[0])
    token = os.environ.get(argv[2], "") if len(argv) == 3 else ""
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            ok = 200 <= resp.status < 300
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (non-2xx) is a URLError
        print(f"unhealthy: {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
