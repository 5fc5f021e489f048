"""Fair share on real vLLM CPU engines: one key floods a model, another still gets served.

One vLLM CPU worker on the locally made tiny model (`max_num_seqs` S), its controller, and
two gateways over the same Redis registry: one with fair share on, one with it off. Key A
("flood") keeps F long requests in flight (ignore_eos, `--long-tokens` each); key B
("interactive") sends one short streamed request a second. B's time to first token (first
SSE event with content, from the moment it is sent) is measured:

- alone: A sends nothing;
- flood, fair share off: A and B through the gateway that passes everything on (the
  engine's first-come queue decides);
- flood, fair share on: A and B through the gateway that queues per key.

With fair share on, B's requests also go straight to the worker, half a second after each
one through the gateway: what the engine itself gives a new request while A's run, the
floor for any gateway. Also A's completed requests per second in each flood phase: what the
place kept for other keys costs the flood. Target (issue 9): with fair share on, B's p99
within 3x its p99 alone.

    .venv/bin/python benchmarks/fair_share.py                      # ~8 minutes
    .venv/bin/python benchmarks/fair_share.py --samples 10 --json-out /tmp/fs.json
    .venv/bin/python benchmarks/fair_share.py --smoke              # plumbing check

Needs Redis (the gateways and the controller share the fleet through it; a prefix of its
own, deleted after). The engine starts once, for all three phases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from engines import VPOOL, EngineWorker, forget_prefix, start_engine_worker
from processes import ProcessGroup, free_ports, wait_until
from stats import interpolated_percentile

from vpool.worker.tiny_model import ensure_tiny_chat_model

MODEL = "tiny-chat"
BASE_PORT = 18300  # the first port to look for free ones from
TOKEN = "bench-registration-token"
FLOOD_KEY, INTERACTIVE_KEY = "sk-bench-flood", "sk-bench-interactive"


@dataclass
class Phase:
    name: str
    ttft_ms: list[float]
    errors: int
    # B's requests straight to the worker, half a second after each through the gateway:
    # what the engine itself gives a new request while A's run (the floor for the gateway).
    direct_ms: list[float] = field(default_factory=list)
    flood_completed: int = 0
    flood_errors: int = 0
    seconds: float = 0.0

    def percentile(self, q: float, direct: bool = False) -> float:
        return interpolated_percentile(self.direct_ms if direct else self.ttft_ms, q)

    @property
    def flood_rps(self) -> float:
        return self.flood_completed / self.seconds if self.seconds else 0.0


def chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def time_to_first_token(client: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    """Milliseconds from sending a streamed request to its first content event."""
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {INTERACTIVE_KEY}"}
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", json=chat(max_tokens, True), headers=headers
    ) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        first = None
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = (time.perf_counter() - started) * 1000
        if first is None:
            raise RuntimeError("the stream had no content")
        return first


async def flood_loop(
    client: httpx.AsyncClient, url: str, tokens: int, phase: Phase, stop: asyncio.Event
) -> None:
    headers = {"Authorization": f"Bearer {FLOOD_KEY}"}
    while not stop.is_set():
        try:
            resp = await client.post(f"{url}/v1/chat/completions", json=chat(tokens, False), headers=headers)
        except httpx.HTTPError:
            phase.flood_errors += 1
            await asyncio.sleep(0.1)
            continue
        if resp.status_code == 200:
            phase.flood_completed += 1
        else:
            phase.flood_errors += 1
            await asyncio.sleep(0.1)


async def run_phase(
    name: str, url: str, args: argparse.Namespace, worker_url: str, flood: bool, probe_engine: bool = False
) -> Phase:
    phase = Phase(name, [], 0)
    limits = httpx.Limits(max_connections=args.flood + 16, max_keepalive_connections=args.flood + 16)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        flooders = []
        # B is a steady user: it has been about before A floods (a key not seen for a
        # minute waits once for a place of A's to end; see vpool/gateway/fair_share.py).
        await time_to_first_token(client, url, args.short_tokens)
        if flood:
            flooders = [
                asyncio.create_task(flood_loop(client, url, args.long_tokens, phase, stop))
                for _ in range(args.flood)
            ]
            await wait_engine_full(client, worker_url, args.max_num_seqs)
        started = time.perf_counter()
        phase.flood_completed = 0  # counted over B's requests only, not the ramp before
        for i in range(args.samples):
            at = time.perf_counter()
            try:
                phase.ttft_ms.append(await time_to_first_token(client, url, args.short_tokens))
                if probe_engine:
                    await asyncio.sleep(0.4)
                    phase.direct_ms.append(await time_to_first_token(client, worker_url, args.short_tokens))
            except (httpx.HTTPError, RuntimeError) as exc:
                phase.errors += 1
                print(f"  {name}: request {i} failed: {exc}", file=sys.stderr)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - at)))
        phase.seconds = time.perf_counter() - started
        stop.set()
        for task in flooders:
            task.cancel()  # their connections close: the engine aborts what they asked
        await asyncio.gather(*flooders, return_exceptions=True)
    await wait_engine_idle(worker_url)
    return phase


async def engine_load(client: httpx.AsyncClient, worker_url: str) -> dict[str, Any]:
    return (await client.get(f"{worker_url}/vpool/load")).json()


async def wait_engine_full(
    client: httpx.AsyncClient, worker_url: str, seqs: int, timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while (await engine_load(client, worker_url))["unfinished"] < seqs - 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the flood did not fill the engine")
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # past the first wave: requests now end and start all the time


async def wait_engine_idle(worker_url: str, timeout_s: float = 120) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.monotonic() + timeout_s
        while (await engine_load(client, worker_url))["unfinished"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not go idle after the flood")
            await asyncio.sleep(0.2)


# --- processes ------------------------------------------------------------------------------


def serves_model(url: str) -> bool:
    try:
        listing = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {INTERACTIVE_KEY}"}).json()
    except (httpx.HTTPError, ValueError):
        return False
    return any(m.get("id") == MODEL for m in listing.get("data", []))


@contextlib.contextmanager
def fleet(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, str, str]]:
    """(gateway with fair share on, gateway with it off, the worker's URL)."""
    prefix = f"vpool-bench-fs-{uuid.uuid4().hex[:8]}"
    controller_port, on_port, off_port, worker_port = free_ports(4, BASE_PORT)
    model_dir = ensure_tiny_chat_model(work / "cache")
    base = {
        "registry": {"url": args.redis_url, "key_prefix": prefix},
        "controller": {"port": controller_port, "registration_token": TOKEN},
        "models": [{"name": MODEL, "model": str(model_dir), "replicas": 0}],
        "cache_dir": str(work / "cache"),
    }
    keys = [{"key": FLOOD_KEY, "name": "flood"}, {"key": INTERACTIVE_KEY, "name": "interactive"}]
    configs = {}
    for name, enabled in (("on", True), ("off", False)):
        configs[name] = work / f"gateway-{name}.yaml"
        gateway = {"keys": keys, "refresh_interval_s": 0.2, "fair_share": {"enabled": enabled}}
        configs[name].write_text(yaml.safe_dump({**base, "gateway": gateway}))
    env = {"VPOOL_REGISTRATION_TOKEN": TOKEN}
    vpool = VPOOL
    controller_url = f"http://127.0.0.1:{controller_port}"
    worker = EngineWorker(
        worker_id="bench-worker",
        model_dir=model_dir,
        served_name=MODEL,
        port=worker_port,
        controller_url=controller_url,
        cache_dir=work / "cache",
        max_model_len=1024,
        engine_args={"kv_cache_memory_bytes": "536870912", "max_num_seqs": str(args.max_num_seqs)},
        nice=args.engine_nice,
        threads=args.engine_threads,
    )
    urls = [f"http://127.0.0.1:{p}" for p in (on_port, off_port)]
    try:
        with ProcessGroup(work) as group:
            group.start("controller", [*vpool, "controller", "--config", str(configs["on"])], env=env)
            for name, port in (("on", on_port), ("off", off_port)):
                gateway_argv = [*vpool, "gateway", "--config", str(configs[name]), "--port", str(port)]
                group.start(f"gateway-{name}", gateway_argv, env=env)
            engine = start_engine_worker(group, worker, env)
            for url in urls:
                wait_until(engine, lambda url=url: serves_model(url), 600, f"serving {MODEL} through {url}")
            yield urls[0], urls[1], f"http://127.0.0.1:{worker_port}"
    finally:
        forget_prefix(args.redis_url, prefix)


# --- report ---------------------------------------------------------------------------------


def report(phases: list[Phase], args: argparse.Namespace) -> dict[str, Any]:
    alone = phases[0]
    lines = [
        f"B's time to first token (ms), {args.samples} requests a phase; A floods with {args.flood} requests "
        f"of {args.long_tokens} tokens; engine max_num_seqs {args.max_num_seqs}",
        "",
        "| phase | p50 | p99 | p99 / alone | B errors | A done/s | A errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        ratio = p.percentile(99) / alone.percentile(99)
        flood = f"{p.flood_rps:.2f}" if p.name != "alone" else "-"
        lines.append(
            f"| {p.name} | {p.percentile(50):.1f} | {p.percentile(99):.1f} | {ratio:.2f}x | {p.errors} | "
            f"{flood} | {p.flood_errors if p.name != 'alone' else '-'} |"
        )
        if p.direct_ms:
            ratio = p.percentile(99, direct=True) / alone.percentile(99)
            lines.append(
                f"| ... B straight to the engine, meanwhile | {p.percentile(50, direct=True):.1f} | "
                f"{p.percentile(99, direct=True):.1f} | {ratio:.2f}x | | | |"
            )
    on = phases[2]
    met = on.percentile(99) <= 3 * alone.percentile(99)
    lines += ["", f"Target (fair share on, p99 within 3x alone): {'met' if met else 'MISSED'}"]
    if phases[1].flood_rps:
        lines.append(f"A's throughput with fair share on: {on.flood_rps / phases[1].flood_rps:.2f}x off")
    print("\n".join(lines))
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "options": {k: v for k, v in vars(args).items() if k != "json_out"},
        "phases": [{**asdict(p), "p50_ms": p.percentile(50), "p99_ms": p.percentile(99)} for p in phases],
        "target_met": met,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=60, help="B's requests per phase (one a second)")
    parser.add_argument("--flood", type=int, default=64, help="A's requests in flight")
    parser.add_argument("--long-tokens", type=int, default=256, help="tokens in each of A's requests")
    parser.add_argument("--short-tokens", type=int, default=8, help="tokens in each of B's requests")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the engine's max_num_seqs")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="the engine's compute threads (default: half the cores; the rest serve the gateway and clients)",
    )
    parser.add_argument(
        "--engine-nice",
        type=int,
        default=10,
        help="the worker's nice value (default 10: it stands in for a GPU, and must not take the CPU "
        "the gateway and the clients need)",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("VPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    parser.add_argument("--smoke", action="store_true", help="3 samples a phase, a small flood")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.flood, args.long_tokens = 3, 12, 64
    with tempfile.TemporaryDirectory(prefix="vpool-bench-fs-") as tmp:
        with fleet(args, Path(tmp)) as (on_url, off_url, worker_url):

            async def phases() -> list[Phase]:
                async with httpx.AsyncClient(timeout=60) as client:  # warm the path
                    for _ in range(3):
                        await time_to_first_token(client, on_url, args.short_tokens)
                return [
                    await run_phase("alone", on_url, args, worker_url, flood=False),
                    await run_phase("flood, fair share off", off_url, args, worker_url, flood=True),
                    await run_phase(
                        "flood, fair share on", on_url, args, worker_url, flood=True, probe_engine=True
                    ),
                ]

            results = asyncio.run(phases())
    summary = report(results, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
