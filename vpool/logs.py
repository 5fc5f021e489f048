"""Log setup for vpool's processes: one line per event, on stderr, under the `vpool` logger.

vLLM configures the root logger itself, so vpool's logger carries its own handler.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("vpool")
    if any(getattr(h, "_vpool", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler._vpool = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
