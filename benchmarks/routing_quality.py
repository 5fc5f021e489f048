"""Routing quality: round-robin, least-outstanding and power-of-two choices, side by side.

Each policy gets the same open-loop traffic through a real `vpool up` gateway in front of
stub engines (`stub_backend.py --slots S --token-delay-ms D`: S requests run at once, the
rest queue, each streams `max_tokens` tokens at D ms apiece). The traffic is skewed on
purpose: Poisson arrivals at a fixed fraction of the fleet's capacity, and heavy-tailed
request sizes (most short, a few long), so that a blind policy now and then queues a short
request behind long ones. Measured at the client: time to first token (first SSE content
event, from the request's *scheduled* arrival, so a late client cannot hide a queue), end to
end latency, completed requests per second, errors, and each worker's share of requests.

    .venv/bin/python benchmarks/routing_quality.py                   # ~4 minutes
    .venv/bin/python benchmarks/routing_quality.py --duration 10 --json-out /tmp/rq.json
    .venv/bin/python benchmarks/routing_quality.py --smoke           # plumbing check

vpool runs as `python -m vpool.cli up` with this interpreter, so `PYTHONPATH=/some/checkout`
benchmarks another copy of vpool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

HERE = Path(__file__).resolve().parent
MODEL = "stub"
POLICIES = ("round_robin", "least_outstanding", "power_of_two")

# Request sizes (max_tokens): a mixture, so a few long requests carry most of the work.
SHORT_SHARE, SHORT_TOKENS, LONG_TOKENS = 0.85, (4, 24), (100, 200)
MEAN_TOKENS = SHORT_SHARE * sum(SHORT_TOKENS) / 2 + (1 - SHORT_SHARE) * sum(LONG_TOKENS) / 2


@dataclass(frozen=True)
class Engine:
    """One stub worker: `slots` requests at once, `delay_factor` x the base token delay."""

    slots: int
    delay_factor: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    engines: tuple[Engine, ...]

    def capacity(self, token_delay_ms: float) -> float:
        """Requests per second the fleet completes when every slot is always busy."""
        return sum(e.slots / (MEAN_TOKENS * token_delay_ms * e.delay_factor / 1000) for e in self.engines)


SCENARIOS = {
    "homogeneous": Scenario("homogeneous", "4 identical workers, 4 slots each", (Engine(4),) * 4),
    "heterogeneous": Scenario(
        "heterogeneous",
        "3 workers with 4 slots + 1 at half speed (4 slots, 2x token delay)",
        (Engine(4),) * 3 + (Engine(4, 2.0),),
    ),
}


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    tokens: int


def make_traffic(rate: float, duration: float, seed: int) -> list[Arrival]:
    """Poisson arrivals with heavy-tailed sizes; the same seed gives every policy the same list."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration:
        low, high = SHORT_TOKENS if rng.random() < SHORT_SHARE else LONG_TOKENS
        arrivals.append(Arrival(t, rng.randint(low, high)))
        t += rng.expovariate(rate)
    return arrivals


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds from its scheduled arrival."""

    scheduled: float
    tokens: int
    ttft: float | None = None
    e2e: float | None = None
    finished_at: float | None = None  # seconds after the start of the run
    worker: str = ""
    error: str | None = None


async def send(
    session: aiohttp.ClientSession, url: str, body: bytes, arrival: Arrival, start: float
) -> Outcome:
    """One streaming chat request; a stream that ends early counts as an error."""
    loop = asyncio.get_running_loop()
    scheduled = start + arrival.at
    out = Outcome(arrival.at, arrival.tokens)
    received, done = 0, False
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            out.worker = resp.headers.get("x-vpool-worker", "")
            if resp.status != 200:
                out.error = f"HTTP {resp.status}"
                await resp.read()
                return out
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif b'"content"' in line:
                    if received == 0:
                        out.ttft = loop.time() - scheduled
                    received += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = type(exc).__name__
        return out
    now = loop.time()
    if not done or received != arrival.tokens:
        out.error = f"short stream ({received}/{arrival.tokens} tokens)"
    else:
        out.e2e, out.finished_at = now - scheduled, now - start
    return out


async def drive(url: str, traffic: list[Arrival], drain_timeout: float) -> list[Outcome]:
    """Open loop: each request leaves at its scheduled time whatever the others are doing."""
    bodies: dict[int, bytes] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        tasks: list[asyncio.Task[Outcome]] = []
        for arrival in traffic:
            delay = start + arrival.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies.get(arrival.tokens)
            if body is None:
                body = bodies[arrival.tokens] = json.dumps(
                    {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": arrival.tokens,
                        "stream": True,
                    }
                ).encode()
            tasks.append(asyncio.create_task(send(session, url, body, arrival, start)))
        if tasks:
            await asyncio.wait(tasks, timeout=drain_timeout)
        outcomes = []
        for task, arrival in zip(tasks, traffic, strict=True):
            if task.done():
                outcomes.append(task.result())
            else:
                task.cancel()
                outcomes.append(Outcome(arrival.at, arrival.tokens, error="unfinished at drain timeout"))
        await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: a value that was observed, which at p99 of a few hundred is honest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Result:
    policy: str
    offered_rps: float
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    throughput_rps: float
    errors: int
    worker_share: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Run:
    """One policy driven by one seed's traffic, on freshly started workers."""

    seed: int
    outcomes: list[Outcome]
    worker_ids: list[str]  # in the scenario's engine order


def summarise(policy: str, runs: list[Run], duration: float, warmup: float) -> Result:
    """Pooled over the runs: latencies of requests scheduled after the warm-up, and
    throughput as completions inside the same window."""
    measured = [(run, o) for run in runs for o in run.outcomes if o.scheduled >= warmup]
    ok = [o for _, o in measured if o.error is None]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    e2e = [o.e2e for o in ok if o.e2e is not None]
    window = (duration - warmup) * len(runs)
    completed = sum(
        1
        for run in runs
        for o in run.outcomes
        if o.finished_at is not None and warmup <= o.finished_at < duration
    )
    errors: dict[str, int] = {}
    for _, o in measured:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    served = [0] * len(runs[0].worker_ids)
    for run, o in measured:
        if o.worker in run.worker_ids:
            served[run.worker_ids.index(o.worker)] += 1
    return Result(
        policy=policy,
        offered_rps=len(measured) / window,
        requests=len(measured),
        ttft_p50_ms=percentile(ttft, 0.50) * 1000,
        ttft_p99_ms=percentile(ttft, 0.99) * 1000,
        e2e_p50_ms=percentile(e2e, 0.50) * 1000,
        e2e_p99_ms=percentile(e2e, 0.99) * 1000,
        throughput_rps=completed / window,
        errors=sum(errors.values()),
        worker_share=[n / max(1, len(measured)) for n in served],
        error_kinds=errors,
    )


# --- processes ------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (the machine is shared: fixed ports would collide)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def endpoint_worker_id(url: str) -> str:
    """The id vpool gives a static endpoint (vpool.controller.external), to attribute shares."""
    return "endpoint-" + hashlib.sha1(url.encode()).hexdigest()[:10]


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def fleet(
    scenario: Scenario, policy: str, token_delay_ms: float, workdir: Path
) -> Iterator[tuple[str, list[str]]]:
    """Stub engines plus `vpool up` over them with `policy`; yields (chat URL, worker ids)."""
    gateway_port, controller_port, *stub_ports = free_ports(2 + len(scenario.engines))
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        urls = []
        for engine, port in zip(scenario.engines, stub_ports, strict=True):
            cmd = [
                sys.executable,
                str(HERE / "stub_backend.py"),
                "--port",
                str(port),
                "--model",
                MODEL,
                "--events",
                "16",
                "--slots",
                str(engine.slots),
                "--token-delay-ms",
                str(token_delay_ms * engine.delay_factor),
            ]
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL), signal.SIGTERM))
            urls.append(f"http://127.0.0.1:{port}")
        config = {
            "gateway": {"host": "127.0.0.1", "port": gateway_port, "routing": policy},
            "controller": {"host": "127.0.0.1", "port": controller_port},
            "endpoints": [{"url": url, "models": [MODEL]} for url in urls],
        }
        config_path = workdir / f"vpool-{scenario.name}-{policy}.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        log_path = workdir / f"vpool-{scenario.name}-{policy}.log"
        with log_path.open("wb") as log:
            vpool = subprocess.Popen(
                [sys.executable, "-m", "vpool.cli", "up", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,  # `-m` puts the cwd first on sys.path: PYTHONPATH must win over it
            )
        # Ctrl-C is vpool up's orderly stop.
        procs.append((vpool, signal.SIGINT))
        base = f"http://127.0.0.1:{gateway_port}"
        wait_until_ready(base, len(urls), vpool, log_path)
        yield base + "/v1/chat/completions", [endpoint_worker_id(u) for u in urls]
    finally:
        for proc, sig in reversed(procs):
            stop_process(proc, sig)


def wait_until_ready(base: str, workers: int, vpool: subprocess.Popen[bytes], log: Path) -> None:
    """Until /health counts every stub as a ready worker for the model."""
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if vpool.poll() is not None:
            raise RuntimeError(f"vpool up exited ({vpool.returncode}):\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if json.load(resp).get("models", {}).get(MODEL) == workers:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"vpool did not list {workers} ready workers in 60 s:\n{log.read_text()[-2000:]}")


# --- report ---------------------------------------------------------------------------------


def table(scenario: Scenario, rate: float, capacity: float, results: list[Result]) -> str:
    base = next((r for r in results if r.policy == "round_robin"), None)
    lines = [
        f"\n{scenario.name}: {scenario.description}; offered {rate:.1f} req/s "
        f"({rate / capacity:.0%} of capacity {capacity:.1f} req/s)",
        f"{'policy':<18} {'TTFT p50':>9} {'TTFT p99':>9} {'E2E p50':>9} {'E2E p99':>9} "
        f"{'req/s':>6} {'errors':>6} {'p99 TTFT vs RR':>15}  share per worker",
    ]
    for r in results:
        ratio = f"{r.ttft_p99_ms / base.ttft_p99_ms:.2f}x" if base and base.ttft_p99_ms > 0 else "-"
        share = "/".join(f"{s:.0%}" for s in r.worker_share)
        lines.append(
            f"{r.policy:<18} {r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.e2e_p50_ms:>7.0f}ms "
            f"{r.e2e_p99_ms:>7.0f}ms {r.throughput_rps:>6.1f} {r.errors:>6} {ratio:>15}  {share}"
        )
    return "\n".join(lines)


def warn_if_policy_ignored(results: list[Result]) -> None:
    """Round-robin splits requests to within one of equal; if not, the setting did nothing."""
    for r in results:
        if r.policy == "round_robin" and r.worker_share and r.errors == 0:
            counts = [share * r.requests for share in r.worker_share]
            if max(counts) - min(counts) > 2 + 0.01 * r.requests:
                print(
                    "warning: round_robin did not split requests evenly: is gateway.routing "
                    "wired into this gateway (make_policy in create_gateway_app)?",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per policy")
    parser.add_argument("--warmup", type=float, default=3.0, help="first seconds left out of the figures")
    parser.add_argument("--load", type=float, default=0.8, help="offered rate as a fraction of capacity")
    parser.add_argument("--token-delay-ms", type=float, default=25.0, help="a full-speed worker's delay")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1],
        help="one traffic sequence per seed; figures pool them all",
    )
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=90.0,
        help="after the last arrival, longest wait for requests in flight",
    )
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds, fast tokens, light load: checks the plumbing, not the policies",
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.load, args.token_delay_ms = 2.0, 0.0, 0.3, 5.0
        args.scenarios = args.scenarios[:1]
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be shorter than --duration")

    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "traffic": {
            "short_share": SHORT_SHARE,
            "short_tokens": SHORT_TOKENS,
            "long_tokens": LONG_TOKENS,
            "mean_tokens": MEAN_TOKENS,
        },
        "scenarios": [],
    }
    print(
        f"{os.cpu_count()} CPUs; {args.duration:g} s per policy per scenario; "
        f"max_tokens {SHORT_SHARE:.0%} in {SHORT_TOKENS}, else in {LONG_TOKENS} (mean {MEAN_TOKENS:.1f}); "
        f"token delay {args.token_delay_ms:g} ms",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="vpool-routing-") as tmp:
        for name in args.scenarios:
            scenario = SCENARIOS[name]
            capacity = scenario.capacity(args.token_delay_ms)
            rate = args.load * capacity
            runs: dict[str, list[Run]] = {policy: [] for policy in args.policies}
            for seed in args.seeds:
                traffic = make_traffic(rate, args.duration, seed)
                for policy in args.policies:  # interleaved, so machine noise hits them alike
                    print(f"  {name} / seed {seed} / {policy}: {len(traffic)} requests...", flush=True)
                    with fleet(scenario, policy, args.token_delay_ms, Path(tmp)) as (url, worker_ids):
                        outcomes = uvloop.run(drive(url, traffic, args.drain_timeout))
                    runs[policy].append(Run(seed, outcomes, worker_ids))
            results = [summarise(p, runs[p], args.duration, args.warmup) for p in args.policies]
            per_seed = {
                p: [
                    asdict(summarise(p, [run], args.duration, args.warmup)) | {"seed": run.seed}
                    for run in runs[p]
                ]
                for p in args.policies
            }
            print(table(scenario, rate, capacity, results), flush=True)
            warn_if_policy_ignored(results)
            report["scenarios"].append(
                {
                    "name": name,
                    "description": scenario.description,
                    "engines": [asdict(e) for e in scenario.engines],
                    "capacity_rps": capacity,
                    "offered_rps": rate,
                    "results": [asdict(r) for r in results],
                    "per_seed": per_seed,
                }
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
