"""Settings every test shares: no test reads or writes the user's own key store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set at import, before any Settings is built, so that spawned processes inherit it too.
os.environ["VPOOL_REGISTRY__KEYS_FILE"] = str(
    Path(tempfile.mkdtemp(prefix="vpool-test-keys-")) / "keys.sqlite3"
)
