"""Closed-loop load with wrk: one Lua script per case, results read back as JSON.

wrk's `done()` hook sees the whole latency histogram and every error counter, so the script
prints them as one JSON line and nothing is scraped from wrk's human output. wrk counts a
status >= 400 as a status error, and connect, read, write and timeout errors separately;
all of them count as errors here. Its latency is to the end of the response, so for a
stream it is the whole stream; `stream_client.py` measures what happens inside one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cases import Case
from processes import pin

MARKER = "WRKJSON "
TIMEOUT_S = 10  # per request; generous so a slow system shows latency, not timeouts

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class WrkResult:
    requests: int  # answered with a status below 400
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_kinds: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # wrk itself failed: no figures

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def write_script(
    case: Case, directory: Path, headers: dict[str, str] | None = None, suffix: str = ""
) -> Path:
    """A wrk script that POSTs the case's body (with `headers` too) and reports through
    `done()`; `suffix` tells apart scripts of one case with different headers."""
    path = directory / f"{case.name}{'-' + suffix if suffix else ''}.lua"
    # json.dumps quotes plain ASCII as Lua reads it ("[[" would open a Lua long string).
    extra = "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items())
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(case.body_bytes().decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + extra + _DONE
    )
    return path


def wrk_executable() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, script: Path, connections: int, seconds: int, cpu: int | None) -> WrkResult:
    """`wrk -t1 -cN -dS` against `url`; its figures, or a result that says why there are none."""
    argv = [
        *pin(cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={TIMEOUT_S}s",
        "-s",
        str(script),
        url,
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        return WrkResult(0, 0.0, 0.0, 0.0, 0, problem="wrk did not finish")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return WrkResult(0, 0.0, 0.0, 0.0, 0, problem=f"wrk exit {done.returncode}: {' | '.join(tail)}")
    raw = json.loads(line[len(MARKER) :])
    kinds = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    return WrkResult(
        requests=raw["requests"] - raw["status"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=sum(kinds.values()),
        error_kinds=kinds,
    )


def wrk_version() -> str:
    try:
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) else "unknown"
