"""The comparison's tables: one for wrk's figures with vpool's ratios, one for streams.

Plain fixed-width text, so the same table reads in a terminal, a CI log and an issue.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_client import StreamStats
from wrk_load import WrkResult

Key = tuple[str, int, str]  # (case, concurrency, system)
REFERENCE = "vpool"
MISSING = "-"

_SYSTEM_COLUMNS = (("req/s", 9), ("p50 ms", 8), ("p99 ms", 8), ("err", 5))
_RATIO_COLUMNS = (("thr", 7), ("Δp50 ms", 9))


def ms(value: float) -> str:
    if value < 10:
        return f"{value:.2f}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _system_cells(result: WrkResult | None) -> list[str]:
    if result is None:
        return [MISSING] * len(_SYSTEM_COLUMNS)
    if result.problem:
        return ["failed", MISSING, MISSING, MISSING]
    if not result.requests:  # nothing answered within the run: no latency to show
        return ["0", MISSING, MISSING, str(result.errors)]
    return [f"{result.rps:,.0f}", ms(result.p50_ms), ms(result.p99_ms), str(result.errors)]


def _ratio_cells(ours: WrkResult | None, theirs: WrkResult | None) -> list[str]:
    usable = [r for r in (ours, theirs) if r is not None and not r.problem and r.rps > 0]
    if len(usable) < 2 or ours is None or theirs is None:
        return [MISSING] * len(_RATIO_COLUMNS)
    return [f"{ours.rps / theirs.rps:.2f}x", f"{ours.p50_ms - theirs.p50_ms:+.2f}"]


def _row(label: list[str], groups: list[list[str]], widths: list[list[int]]) -> str:
    parts = [f"{label[0]:<11}{label[1]:>5}"]
    for cells, cell_widths in zip(groups, widths, strict=True):
        parts.append("".join(f"{cell:>{w}}" for cell, w in zip(cells, cell_widths, strict=True)))
    return "  ".join(parts).rstrip()


def results_table(
    results: dict[Key, WrkResult],
    cases: Sequence[str],
    concurrencies: Sequence[int],
    systems: Sequence[str],
) -> str:
    """Rows: case x concurrency. Columns: each system's figures, then vpool / each other system."""
    others = [s for s in systems if s != REFERENCE] if REFERENCE in systems else []
    system_widths = [w for _, w in _SYSTEM_COLUMNS]
    ratio_widths = [w for _, w in _RATIO_COLUMNS]
    widths = [system_widths] * len(systems) + [ratio_widths] * len(others)

    titles = [*systems, *(f"{REFERENCE}/{o}" for o in others)]
    title_line = " " * 16
    for title, group in zip(titles, widths, strict=True):
        title_line += "  " + f"{title:>{sum(group)}}"
    system_headers = [h for h, _ in _SYSTEM_COLUMNS]
    ratio_headers = [h for h, _ in _RATIO_COLUMNS]
    headers = [system_headers] * len(systems) + [ratio_headers] * len(others)
    lines = [title_line.rstrip(), _row(["case", "conc"], headers, widths)]
    for case in cases:
        for concurrency in concurrencies:
            row = [results.get((case, concurrency, system)) for system in systems]
            ours = results.get((case, concurrency, REFERENCE))
            ratios = [_ratio_cells(ours, results.get((case, concurrency, o))) for o in others]
            lines.append(_row([case, str(concurrency)], [_system_cells(r) for r in row] + ratios, widths))
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def streams_table(stats: dict[str, StreamStats]) -> str:
    """One row per system: how streams look from inside (stream_client.py)."""
    header = (
        f"{'system':<13}{'streams':>9}{'err':>6}{'events':>8}"
        f"{'TTFE p50':>10}{'TTFE p99':>10}{'gap p50':>9}{'gap p99':>9}   (ms)"
    )
    lines = [header]
    for system, s in stats.items():
        lines.append(
            f"{system:<13}{s.streams:>9,}{s.errors:>6}{s.events_per_stream:>8.1f}"
            f"{ms(s.ttfe_p50_ms):>10}{ms(s.ttfe_p99_ms):>10}{ms(s.gap_p50_ms):>9}{ms(s.gap_p99_ms):>9}"
        )
    rule = "-" * len(header)
    return "\n".join([rule, *lines, rule])
