"""`benchmarks/prefix_cost.py --decision-only` runs: the in-process half of the prefix
routing cost benchmark cannot rot unnoticed. Not a performance test: no figure is judged,
only that both policies were measured and reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_prefix_cost_decision_measures_both_policies(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "prefix_cost.py"), "--decision-only", "--bodies", "40",
         "--gateway-cpu", "0", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    decision = json.loads(out.read_text())["decision_us"]
    assert set(decision) == {"least_outstanding", "prefix"}
    assert all(us > 0 for us in decision.values())
    assert "prefix adds" in done.stdout
