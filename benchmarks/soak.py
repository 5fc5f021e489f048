"""A million requests through a gateway, and its memory after every chunk of them.

A gateway that keeps a little per request (an unclosed response, a growing dict of request
ids, a metrics label per client) looks fine for a minute and dies in a week. This drives
`--requests` requests through the system with wrk in chunks of `--chunk-seconds`, rotating
through the cases, and reads the gateway's resident memory (VmRSS in /proc/PID/status)
after each chunk. The target (issue #3): memory flat, within 10%, from after the warm-up
to the end of a million requests.

    python benchmarks/soak.py                          # 1,000,000 requests through vpool
    python benchmarks/soak.py --requests 50000 --chunk-seconds 5 --json-out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cases import CASES
from processes import (
    ProcessGroup,
    StartupError,
    free_ports,
    raise_open_files,
    rss_kib,
    sigterm_as_interrupt,
    wait_idle,
)
from systems import (
    SYSTEMS,
    Launch,
    Running,
    add_launch_options,
    cores,
    log_directory,
    start_backend,
    start_system,
)
from wrk_load import run_wrk, write_script, wrk_executable

TARGET_GROWTH_PCT = 10.0


@dataclass
class Chunk:
    case: str
    requests: int
    rps: float
    errors: int
    rss_kib: int


@dataclass
class Soak:
    system: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rss_start_kib: int = 0
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def rss_peak_kib(self) -> int:
        return max([self.rss_start_kib, *(c.rss_kib for c in self.chunks)])

    @property
    def rss_end_kib(self) -> int:
        return self.chunks[-1].rss_kib if self.chunks else self.rss_start_kib

    def growth_pct(self, kib: int) -> float:
        return 100 * (kib - self.rss_start_kib) / self.rss_start_kib if self.rss_start_kib else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests to drive (at least)")
    parser.add_argument("--chunk-seconds", type=int, default=10, help="wrk run between memory readings")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="cases taken in turn, one per chunk",
    )
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before the first reading")
    parser.add_argument("--system", choices=SYSTEMS, default="vpool")
    parser.add_argument("--json-out", type=Path)
    add_launch_options(parser)
    return parser.parse_args(argv)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def soak(running: Running, args: argparse.Namespace, load_cpu: int | None, log_dir: Path) -> Soak:
    """Warm up, read memory, then drive chunks until `--requests` answers, reading after each."""
    scripts = {name: write_script(CASES[name], log_dir) for name in args.cases}
    url = running.base_url

    def load(case: str, seconds: int) -> Chunk:
        result = run_wrk(url + CASES[case].path, scripts[case], args.concurrency, seconds, load_cpu)
        if result.problem:
            raise StartupError(f"wrk failed: {result.problem}")
        wait_idle(running.pid, timeout_s=30)  # read memory once the chunk's last requests are done
        return Chunk(case, result.requests, result.rps, result.errors, rss_kib(running.pid) or 0)

    for case in args.cases:
        load(case, max(1, args.warmup // len(args.cases)))
    state = Soak(running.name, rss_start_kib=rss_kib(running.pid) or 0)
    print(f"after warm-up: RSS {mib(state.rss_start_kib)}", flush=True)
    started = time.monotonic()
    while state.requests < args.requests:
        chunk = load(args.cases[len(state.chunks) % len(args.cases)], args.chunk_seconds)
        state.chunks.append(chunk)
        state.requests += chunk.requests
        state.errors += chunk.errors
        state.seconds = time.monotonic() - started
        left = max(0, args.requests - state.requests) / (state.requests / state.seconds or 1)
        print(
            f"  {len(state.chunks):>4}  {chunk.case:<11}{state.requests:>12,} requests  "
            f"{chunk.rps:>8,.0f} req/s  {state.errors} errors  RSS {mib(chunk.rss_kib)} "
            f"({state.growth_pct(chunk.rss_kib):+.1f}%)  ~{left:.0f} s left",
            flush=True,
        )
    return state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if wrk_executable() is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    gateway_cpu, load_cpu, pin_note = cores(args)
    raise_open_files(65536)
    log_dir = log_directory(args, "vpool-soak-")
    print(
        f"soak: {args.requests:,} requests through {args.system}, wrk -c{args.concurrency}, "
        f"{args.chunk_seconds} s chunks of {', '.join(args.cases)}; logs in {log_dir}",
        flush=True,
    )
    if pin_note:
        print(f"note: {pin_note}")
    try:
        with sigterm_as_interrupt(), ProcessGroup(log_dir) as group:
            (stub_port,) = free_ports(1, args.base_port)
            backend = start_backend(group, stub_port, load_cpu)
            running = start_system(
                args.system,
                Launch(group, backend, gateway_cpu, args.base_port, args.peers_venv, args.gateway_processes),
            )
            result = soak(running, args, load_cpu, log_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    growth = result.growth_pct(result.rss_end_kib)
    print(
        f"\n{result.system}: {result.requests:,} requests in {result.seconds:.0f} s, {result.errors} errors"
    )
    print(
        f"gateway RSS: start {mib(result.rss_start_kib)} (after warm-up), peak {mib(result.rss_peak_kib)} "
        f"({result.growth_pct(result.rss_peak_kib):+.1f}%), end {mib(result.rss_end_kib)}"
    )
    verdict = "within" if abs(growth) <= TARGET_GROWTH_PCT else "OUTSIDE"
    print(f"growth start -> end: {growth:+.1f}% ({verdict} the {TARGET_GROWTH_PCT:g}% target)")
    print(f"logs: {log_dir}")
    if args.json_out:
        document = {
            **asdict(result),
            "rss_peak_kib": result.rss_peak_kib,
            "rss_end_kib": result.rss_end_kib,
            "growth_pct": round(growth, 2),
        }
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"results: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
