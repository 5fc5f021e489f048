"""What the `prefix` routing policy costs the gateway's CPU per request, against the default.

Two measures, least_outstanding then prefix, on the same traffic: chat requests over a few
long system prompts (about 3,000 characters each) and many users, a conversation of a few
turns each (the shared-prefix traffic `prefix` is for).

- `decision`: in this process, what the request path does that depends on the policy: the
  body's parse, the prefix key (none for least_outstanding) and the choice among four ready
  workers. Microseconds per request, the best of a few rounds.
- `gateway`: `vpool up` in front of four stub backends (`stub_backend.py`, as endpoints),
  the gateway on one core, the stubs and wrk on the other (as compare.py does), wrk rotating
  over the bodies for `--duration` seconds. The gateway process's CPU seconds (from /proc)
  over the requests answered: CPU per request, and the throughput. Then vllm-router in
  front of the same stubs, with its own prefix policy (`cache_aware`) and `round_robin`,
  when it is installed (`--peers-venv`): vpool's throughput over theirs, from one run.

    python benchmarks/prefix_cost.py                  # both, 10 s per policy
    python benchmarks/prefix_cost.py --duration 3 --concurrency 16
    python benchmarks/prefix_cost.py --decision-only  # no processes: a few seconds
    python benchmarks/prefix_cost.py --peers-venv .peers-venv   # with vllm-router

It is a benchmark, not a test: run it on a quiet machine. The gateway is CPU-bound here
(the stubs answer at once), so its CPU per request is about 1 / its throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cases import MODEL
from processes import Process, ProcessGroup, cpu_seconds, free_ports, pin_self, wait_until
from systems import REPO, find_peer, lists_model, start_backend, start_vllm_router
from wrk_load import _DONE, _lua_string, run_wrk

from vpool.config import PrefixRoutingSettings
from vpool.gateway.fleet import Fleet
from vpool.gateway.request_body import parse_openai_request
from vpool.gateway.routing import make_policy
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import WorkerLoad, WorkerRecord, WorkerState

POLICIES = ("least_outstanding", "prefix")
# vllm-router's own prefix policy (a radix tree of every prompt) and its plain one.
ROUTER_POLICIES = ("cache_aware", "round_robin")
WORKERS = 4


def bodies(count: int, seed: int = 1) -> list[bytes]:
    """`count` chat bodies: 4 system prompts, each with its users' conversations of 1-4 turns."""
    rng = random.Random(seed)
    words = "the of and model worker cache prompt token answer question user system reply".split()
    systems = [" ".join(rng.choice(words) for _ in range(500))[:3000] for _ in range(4)]
    out = []
    for i in range(count):
        messages: list[dict[str, Any]] = [{"role": "system", "content": systems[i % len(systems)]}]
        for turn in range(rng.randint(1, 4)):
            messages.append(
                {"role": "user", "content": f"user {i} turn {turn}: " + " ".join(rng.choices(words, k=30))}
            )
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=60))})
        messages.pop()
        out.append(json.dumps({"model": MODEL, "messages": messages, "max_tokens": 16}).encode())
    return out


def measure_decision(traffic: list[bytes], rounds: int = 5) -> dict[str, float]:
    """Microseconds per request of parse + key + choice, per policy (the best round)."""
    workers = [
        WorkerRecord(
            worker_id=f"worker-{i}",
            url=f"http://127.0.0.1:{9000 + i}",
            models=[MODEL],
            state=WorkerState.READY,
            load=WorkerLoad(),
        )
        for i in range(WORKERS)
    ]
    result = {}
    for name in POLICIES:
        fleet = Fleet(MemoryRegistry(), make_policy(name, PrefixRoutingSettings()), {MODEL}, 1.0)
        fleet._ready = {MODEL: workers}  # what a refresh would have read from the registry
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for body in traffic:
                request = parse_openai_request(body)
                key = fleet.routing_key("chat", request) if fleet.keyed else None
                fleet.choose(MODEL, key=key)
            best = min(best, (time.process_time() - started) / len(traffic))
        result[name] = best * 1e6
    return result


def wrk_script(traffic: list[bytes], directory: Path) -> Path:
    """A wrk script that POSTs the bodies in turn."""
    path = directory / "prefix-chat.lua"
    listed = ",\n".join(_lua_string(b.decode()) for b in traffic)
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{listed}\n}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        '  return wrk.format(nil, "/v1/chat/completions", nil, bodies[i])\n'
        "end\n" + _DONE
    )
    return path


def health_counts(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return int(json.load(resp).get("models", {}).get(MODEL, 0))
    except OSError:
        return 0


def shares(url: str, traffic: list[bytes]) -> dict[str, int]:
    """Which worker answered each of the bodies, sent one at a time."""
    seen: dict[str, int] = {}
    for body in traffic:
        req = urllib.request.Request(
            url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            worker = resp.headers.get("x-vpool-worker", "?")
        seen[worker] = seen.get(worker, 0) + 1
    return dict(sorted(seen.items()))


def measure_gateway(
    args: argparse.Namespace, traffic: list[bytes], log_dir: Path
) -> dict[str, dict[str, Any]]:
    """Each vpool policy, then each vllm-router policy, in front of the same four stubs."""
    results: dict[str, dict[str, Any]] = {}
    script = wrk_script(traffic, log_dir)
    with ProcessGroup(log_dir) as group:
        ports = free_ports(WORKERS + 2, args.port_base)
        backends = [start_backend(group, port, args.load_cpu) for port in ports[:WORKERS]]
        for name in args.policies:
            config = log_dir / f"{name}.yaml"
            endpoints = "".join(f"  - url: {b.base_url}\n    models: [{MODEL}]\n" for b in backends)
            config.write_text(
                f"gateway: {{host: 127.0.0.1, port: {ports[-2]}, routing: {name}, "
                f"prefix_routing: {args.prefix_routing}}}\n"
                f"controller: {{host: 127.0.0.1, port: {ports[-1]}}}\n"
                f"cache_dir: {log_dir / (name + '-cache')}\n"
                "endpoints:\n" + endpoints
            )
            up = [sys.executable, "-m", "vpool.cli", "up", "--config", str(config)]
            process = group.start(f"vpool-{name}", up, args.gateway_cpu, cwd=REPO)
            url = f"http://127.0.0.1:{ports[-2]}"
            wait_until(
                process, lambda u=url: health_counts(u) == WORKERS, 60.0, f"routing to {WORKERS} workers"
            )
            results[name] = {**load(args, script, process, url), "shares_of_200": shares(url, traffic[:200])}
            group.stop(process)
        for policy in args.router_policies:
            name = f"vllm-router-{policy}"
            worker_urls = [b.base_url for b in backends]
            process, url = start_vllm_router(
                group, worker_urls, args.gateway_cpu, args.port_base + 50, args.peers_venv, policy, name
            )
            wait_until(process, lambda u=url: lists_model(u), 60.0, f"listing `{MODEL}`")
            results[name] = load(args, script, process, url)
            group.stop(process)
    return results


def load(args: argparse.Namespace, script: Path, process: Process, url: str) -> dict[str, Any]:
    """wrk on `url` after a second's warm-up: throughput, latency and the gateway's CPU per request."""
    run_wrk(url, script, args.concurrency, 1, args.load_cpu)  # warm-up
    before = cpu_seconds(process.pid) or 0.0
    result = run_wrk(url, script, args.concurrency, args.duration, args.load_cpu)
    used = (cpu_seconds(process.pid) or 0.0) - before
    return {
        "requests": result.requests,
        "rps": round(result.rps, 1),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "cpu_us_per_request": round(used / result.requests * 1e6, 1) if result.requests else None,
        "problem": result.problem,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per policy")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections")
    parser.add_argument("--bodies", type=int, default=400, help="distinct requests in the rotation")
    parser.add_argument("--gateway-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    parser.add_argument("--port-base", type=int, default=18600)
    parser.add_argument("--decision-only", action="store_true", help="the in-process measure alone")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument(
        "--prefix-routing", default="{}", help="gateway.prefix_routing, YAML flow: '{epsilon: 1.0}'"
    )
    parser.add_argument(
        "--router-policies", nargs="*", default=list(ROUTER_POLICIES),
        help="vllm-router policies to run in front of the same stubs (none without --peers-venv or "
        "vllm-router on PATH)",
    )  # fmt: skip
    parser.add_argument("--peers-venv", type=Path, help="virtual environment holding vllm-router")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if find_peer("vllm-router", args.peers_venv) is None:
        args.router_policies = []
    return args


def ratios(gateway: dict[str, dict[str, Any]]) -> dict[str, float]:
    """vpool's throughput over each vllm-router's, per vpool policy, from the same run."""
    out = {}
    for ours in POLICIES:
        for theirs in (f"vllm-router-{p}" for p in ROUTER_POLICIES):
            if ours in gateway and theirs in gateway and gateway[theirs]["rps"]:
                out[f"vpool {ours} / {theirs}"] = round(gateway[ours]["rps"] / gateway[theirs]["rps"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    traffic = bodies(args.bodies)
    print(f"{len(traffic)} bodies, {sum(map(len, traffic)) // len(traffic)} bytes on average", flush=True)
    everywhere = os.sched_getaffinity(0)
    pin_self(args.gateway_cpu)  # the decision is measured on the gateway's core
    decision = measure_decision(traffic)
    print("decision (parse + key + choice, 4 workers), µs per request:", flush=True)
    for name, us in decision.items():
        print(f"  {name:18} {us:7.2f}")
    print(f"  prefix adds        {decision['prefix'] - decision['least_outstanding']:7.2f}")
    out: dict[str, Any] = {"decision_us": decision}
    if not args.decision_only:
        os.sched_setaffinity(0, everywhere)
        with tempfile.TemporaryDirectory(prefix="prefix-cost-") as tmp:
            gateway = measure_gateway(args, traffic, Path(tmp))
        out["gateway"] = gateway
        print(f"gateway (wrk -c{args.concurrency}, {args.duration} s):")
        print(
            f"  {'system':28} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10} errors"
            "  shares of 200"
        )
        for name, r in gateway.items():
            print(
                f"  {name:28} {r['rps']:8.1f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                f"{r['cpu_us_per_request'] or 0:10.1f} {r['errors']:6}  {r.get('shares_of_200', '-')}"
                + (f"  ({r['problem']})" if r["problem"] else "")
            )
        out["ratios"] = ratios(gateway)
        for label, ratio in out["ratios"].items():
            print(f"  {label:44} {ratio:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
