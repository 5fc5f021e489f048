"""Percentiles for the benchmarks on real engines (fair share, prefix routing)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def interpolated_percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the two nearest ranks; NaN for no values.

    (stream_client.py and routing_quality.py report nearest-rank percentiles instead: with
    hundreds of samples the two differ by less than the run-to-run noise.)
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
