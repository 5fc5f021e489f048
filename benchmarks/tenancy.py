"""What keys, limits and usage cost the gateway: vpool with them on, against Redis, beside the
same gateway with one static key, and vllm-router (which does none of it).

All three in front of the same stub backend (`stub_backend.py`), measured in one run with
wrk on the same cores (the gateway alone on `--gateway-cpu`; the stub, wrk and the
controller on `--load-cpu`):

- `vpool-static`: split mode (`vpool controller` + `vpool gateway`) over Redis, one key from
  `gateway.api_keys`: no limits to keep;
- `vpool-keys`: the same, the key from `gateway.keys` with `rpm`, `tpm` and `max_parallel`
  (set high enough never to refuse): every request is admitted by one Redis script, its
  tokens settled and its usage counted per key, model and hour, written to Redis each second;
- `vllm-router`: Rust, no keys (from `--peers-venv`, PATH or `.peers-venv`; skipped if absent).

Also Redis round trips per request for each vpool: the script calls (EVALSHA) Redis served
over the wrk run, less what the same gateway sends idle over as long (its heartbeat), over
the requests answered. (Token corrections and usage go once a second, off the path.)

    .venv/bin/python benchmarks/tenancy.py                        # ~3 minutes
    .venv/bin/python benchmarks/tenancy.py --duration 4 --concurrency 32 --json-out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import redis
from cases import CASES, MODEL
from processes import ProcessGroup, StartupError, free_ports, pin_self, wait_until
from systems import (
    REDIS_URL,
    Launch,
    Running,
    add_launch_options,
    cores,
    find_peer,
    log_directory,
    start_backend,
    start_system,
    start_vpool,
)
from wrk_load import WrkResult, run_wrk, write_script

SYSTEMS = ("vpool-static", "vpool-keys", "vllm-router")
STATIC_KEY, TENANT_KEY = "sk-bench-static", "sk-bench-tenant"
# Limits a benchmark never reaches: what is measured is keeping them, not refusing.
HIGH_LIMITS = "rpm: 1000000000, tpm: 1000000000000, max_parallel: 1000000"


@dataclass
class Measured:
    system: str
    case: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    redis_per_request: float | None


def start_keyed_vpool(name: str, launch: Launch, load_cpu: int | None) -> tuple[Running, str]:
    """Split mode (its controller on the load core) with this system's key; and the key."""
    secret = STATIC_KEY if name == "vpool-static" else TENANT_KEY
    keys = (
        f"api_keys: ['{STATIC_KEY}']"
        if name == "vpool-static"
        else f"keys: [{{key: '{TENANT_KEY}', name: bench, {HIGH_LIMITS}}}]"
    )
    process, url = start_vpool(name, launch, gateway_options=keys, split=True, controller_cpu=load_cpu)
    headers = {"Authorization": f"Bearer {secret}"}

    def lists_model() -> bool:
        try:
            listing = httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return any(m.get("id") == MODEL for m in listing.get("data", []))

    wait_until(process, lists_model, 60.0, f"listing `{MODEL}`")
    return Running(name, url, process.pid, process), secret


def redis_commands(client: redis.Redis) -> int:
    """Script calls Redis has served: each a round trip (commands a script runs inside it are
    counted by Redis too, and are not round trips)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def measure(args: argparse.Namespace, log_dir: Path) -> tuple[list[Measured], list[str]]:
    gateway_cpu, load_cpu, pin_note = cores(args)
    notes = [pin_note] if pin_note else []
    results: list[Measured] = []
    counter = redis.Redis.from_url(REDIS_URL)
    with ProcessGroup(log_dir) as group:
        pin_self(load_cpu)
        (stub_port,) = free_ports(1, args.base_port)
        backend = start_backend(group, stub_port, load_cpu)
        launch = Launch(group, backend, gateway_cpu, args.base_port, args.peers_venv)
        for system in args.systems:
            if system == "vllm-router" and find_peer(system, args.peers_venv) is None:
                notes.append("vllm-router: skipped, not installed (see benchmarks/README.md)")
                continue
            print(f"{system}:", flush=True)
            try:
                if system == "vllm-router":
                    running, headers = start_system(system, launch), None
                else:
                    running, secret = start_keyed_vpool(system, launch, load_cpu)
                    headers = {"Authorization": f"Bearer {secret}"}
            except StartupError as error:
                notes.append(f"{system}: not measured: {error}")
                continue
            scripts = {c: write_script(CASES[c], log_dir, headers, suffix=system) for c in args.cases}
            run_wrk(running.base_url + CASES["chat"].path, scripts[args.cases[0]], 32, 2, load_cpu)  # warm
            idle_rate = 0.0
            if system != "vllm-router":
                before = redis_commands(counter)
                time.sleep(3.0)
                idle_rate = (redis_commands(counter) - before) / 3.0
            for case in args.cases:
                for c in args.concurrency:
                    before = redis_commands(counter)
                    result: WrkResult = run_wrk(
                        running.base_url + CASES[case].path, scripts[case], c, args.duration, load_cpu
                    )
                    spent = redis_commands(counter) - before - idle_rate * result.seconds
                    per_request = (
                        spent / result.requests if result.requests and system != "vllm-router" else None
                    )
                    results.append(
                        Measured(
                            system,
                            case,
                            c,
                            result.rps,
                            result.p50_ms,
                            result.p99_ms,
                            result.errors,
                            per_request,
                        )
                    )
                    if result.problem:
                        notes.append(f"{system} {case} c={c}: wrk failed: {result.problem}")
                    redis_note = (
                        f"  {per_request:.2f} Redis round trips/request" if per_request is not None else ""
                    )
                    print(
                        f"  {case:<7} c={c:<4} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:.2f} ms  "
                        f"p99 {result.p99_ms:.2f} ms  {result.errors} errors{redis_note}",
                        flush=True,
                    )
            if running.process is not None:
                group.stop(running.process)
    return results, notes


def _ratio(mine: Measured, other: Measured | None) -> str:
    return f"{mine.rps / other.rps:.2f}x" if other and other.rps else "-"


def _rps(m: Measured | None) -> str:
    return f"{m.rps:,.0f}" if m else "-"


def _redis(m: Measured | None) -> str:
    return f"{m.redis_per_request:.2f}" if m and m.redis_per_request is not None else "-"


def report(results: list[Measured], notes: list[str]) -> None:
    by = {(r.system, r.case, r.concurrency): r for r in results}
    print(
        "\n| case | conc | vpool-keys req/s | vpool-static req/s | vllm-router req/s | keys/static "
        "| keys/vllm-router | Redis round trips/request (keys, static) | p99 ms (keys, static, router) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.system != "vpool-keys":
            continue
        static = by.get(("vpool-static", r.case, r.concurrency))
        router = by.get(("vllm-router", r.case, r.concurrency))
        p99s = ", ".join(f"{m.p99_ms:.2f}" if m else "-" for m in (r, static, router))
        print(
            f"| {r.case} | {r.concurrency} | {_rps(r)} | {_rps(static)} | {_rps(router)} "
            f"| {_ratio(r, static)} | {_ratio(r, router)} | {_redis(r)}, {_redis(static)} | {p99s} |"
        )
    for note in notes:
        print(f"note: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_launch_options(parser)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--cases", nargs="+", choices=["chat", "stream"], default=["chat", "stream"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--duration", type=int, default=8, help="seconds per case")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    log_dir = log_directory(args, "vpool-bench-tenancy-")
    print(f"logs and configs: {log_dir}", flush=True)
    results, notes = measure(args, log_dir)
    report(results, notes)
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"results": [asdict(r) for r in results], "notes": notes}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
