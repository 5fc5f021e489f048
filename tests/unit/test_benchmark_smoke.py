"""The gateway comparison runs end to end: `benchmarks/compare.py --smoke` measures direct and vpool.

Not a performance test (benchmarks are never pass/fail on figures): it proves the one
command starts the stub and vpool, loads every case through both with wrk, reads the
figures back, prints the table and stops every process, so the benchmark cannot rot
unnoticed. It needs `wrk` on PATH (`scripts/test.sh` installs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CASES = ("chat", "stream", "embeddings")
CONCURRENCY = (1, 32)
SYSTEMS = ("direct", "vpool")


def test_compare_smoke_measures_every_case_through_direct_and_vpool(tmp_path: Path) -> None:
    results_file = tmp_path / "smoke.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "compare.py"),
            "--smoke",
            "--json-out",
            str(results_file),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    # The printed table: one row per case x concurrency, each system's four cells
    # (req/s, p50, p99, errors) in order, then vpool/direct's two.
    rows = {
        (cells[0], int(cells[1])): cells[2:]
        for cells in (line.split() for line in done.stdout.splitlines())
        if len(cells) == 12 and cells[0] in CASES and cells[1].isdigit()
    }
    assert set(rows) == {(case, c) for case in CASES for c in CONCURRENCY}, output
    for cells in rows.values():
        for group in (cells[0:4], cells[4:8]):  # direct, vpool
            assert float(group[0].replace(",", "")) > 0, output
            assert group[3] == "0", output

    document = json.loads(results_file.read_text())
    for system in SYSTEMS:
        measured = {(r["case"], r["concurrency"]): r for r in document["results"] if r["system"] == system}
        assert set(measured) == set(rows)
        assert all(r["rps"] > 0 and r["errors"] == 0 and r["problem"] is None for r in measured.values())
        streams = document["streams"][system]
        assert streams["streams"] > 0 and streams["errors"] == 0
        assert streams["events_per_stream"] >= 16

    assert not list_our_processes(tmp_path / "logs"), "a benchmark process outlived the run"


def list_our_processes(log_dir: Path) -> list[str]:
    """Command lines still running that name this run's files (its vpool config, for one)."""
    done = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if str(log_dir) in line]
