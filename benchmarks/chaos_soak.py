"""Chaos soak: many requests and streams through vpool while its workers are killed and
restarted at random. Counts every request by how it ended, for the user who sent it:

- completed: a JSON answer with choices, or a stream that ended with `data: [DONE]`;
- openai_error: an HTTP error with an OpenAI error body, or a stream that ended with an
  OpenAI error event (`data: {"error": ...}`) and no `[DONE]`;
- lost: anything else (a reset, a hang past the client's timeout, a stream cut short that
  looks complete or ends mid-event, a body that is not what the status says). Must be 0.

    python benchmarks/chaos_soak.py                       # 3 workers, 64 clients, 120 s
    python benchmarks/chaos_soak.py --duration 20 --clients 16

The workers are stub backends (`stub_backend.py`, streams of `--events` events spaced by
`--event-delay-ms`) registered as static endpoints of `vpool up`; a chaos loop SIGKILLs a
random one every `--kill-every` seconds and restarts it on the same port after a pause.
Exit code 1 when any request was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from cases import MODEL
from processes import Process, ProcessGroup, free_ports, wait_until
from systems import HERE, REPO, lists_model, log_directory

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    kills: int = 0

    def lost(self, why: str) -> None:
        self.outcomes["lost"] += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(why)


def classify_json(status: int, body: bytes) -> str | None:
    """`completed`/`openai_error`, or None when the body does not match the status."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if status == 200 and isinstance(data, dict) and data.get("choices"):
        return "completed"
    if status >= 400 and isinstance(data, dict) and isinstance(data.get("error"), dict):
        return "openai_error" if data["error"].get("message") else None
    return None


def classify_stream(raw: bytes) -> str | None:
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    if not raw.endswith(b"\n\n") or not events:
        return None
    if events[-1] == b"data: [DONE]":
        return "completed"
    last = events[-1]
    if last.startswith(b"data: "):
        try:
            payload = orjson.loads(last[6:])
        except orjson.JSONDecodeError:
            return None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            return "openai_error"
    return None


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally) -> None:
    body = {**CHAT, "stream": stream}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            verdict = classify_stream(raw) if is_sse else classify_json(resp.status, raw)
            if verdict is None:
                tally.lost(f"status {resp.status}, {'stream' if is_sse else 'json'}: {raw[-120:]!r}")
            else:
                tally.outcomes[verdict] += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.lost(f"{type(exc).__name__}: {exc}")


async def client_loop(url: str, deadline: float, rng: random.Random, tally: Tally, timeout_s: float) -> None:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            await one_request(session, url, rng.random() < 0.7, tally)


@dataclass
class Worker:
    name: str
    port: int
    process: Process | None = None


def start_worker(group: ProcessGroup, worker: Worker, args: argparse.Namespace) -> None:
    argv = [
        sys.executable, str(HERE / "stub_backend.py"), "--port", str(worker.port), "--model", MODEL,
        "--events", str(args.events), "--event-delay-ms", str(args.event_delay_ms),
    ]  # fmt: skip
    worker.process = group.start(worker.name, argv)
    url = f"http://127.0.0.1:{worker.port}"
    wait_until(worker.process, lambda: lists_model(url), 30.0, "serving")


async def chaos_loop(
    group: ProcessGroup, workers: list[Worker], args: argparse.Namespace, deadline: float, tally: Tally
) -> None:
    rng = random.Random(args.seed)
    while time.monotonic() + args.kill_every < deadline:
        await asyncio.sleep(args.kill_every * rng.uniform(0.5, 1.5))
        victim = rng.choice(workers)
        if victim.process is None or not victim.process.alive:
            continue
        os.kill(victim.process.pid, signal.SIGKILL)
        tally.kills += 1
        print(f"  {time.strftime('%H:%M:%S')} killed {victim.name}", flush=True)
        await asyncio.sleep(rng.uniform(1.0, args.kill_every))
        await asyncio.to_thread(start_worker, group, victim, args)
        print(f"  {time.strftime('%H:%M:%S')} restarted {victim.name}", flush=True)


def start_vpool(group: ProcessGroup, workers: list[Worker], log_dir: Path, base_port: int) -> str:
    port, controller_port = free_ports(2, base_port)
    endpoints = "".join(f"  - url: http://127.0.0.1:{w.port}\n    models: [{MODEL}]\n" for w in workers)
    config = log_dir / "vpool.yaml"
    config.write_text(
        f"gateway: {{host: 127.0.0.1, port: {port}}}\n"
        f"controller: {{host: 127.0.0.1, port: {controller_port}}}\n"
        f"cache_dir: {log_dir / 'vpool-cache'}\n"
        f"endpoints:\n{endpoints}"
    )
    argv = [sys.executable, "-m", "vpool.cli", "up", "--config", str(config)]
    process = group.start("vpool", argv, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_until(process, lambda: lists_model(url), 60.0, f"listing `{MODEL}`")
    return url


async def soak(url: str, group: ProcessGroup, workers: list[Worker], args: argparse.Namespace) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + args.duration
    rng = random.Random(args.seed)
    clients = [
        client_loop(url, deadline, random.Random(rng.random()), tally, args.client_timeout)
        for _ in range(args.clients)
    ]
    await asyncio.gather(chaos_loop(group, workers, args, deadline, tally), *clients)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (70 %% stream)")
    parser.add_argument("--workers", type=int, default=3, help="stub workers behind vpool")
    parser.add_argument("--events", type=int, default=20, help="events per stream")
    parser.add_argument("--event-delay-ms", type=float, default=20.0, help="time between stream events")
    parser.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between kills")
    parser.add_argument("--client-timeout", type=float, default=30.0, help="a request past this is lost")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=18300)
    parser.add_argument("--log-dir", type=Path)
    args = parser.parse_args(argv)
    log_dir = log_directory(args, "vpool-chaos-")
    print(f"chaos soak: {args.clients} clients for {args.duration:g} s through vpool, {args.workers} workers "
          f"killed about every {args.kill_every:g} s; logs in {log_dir}", flush=True)  # fmt: skip
    with ProcessGroup(log_dir) as group:
        ports = free_ports(args.workers, args.base_port + 10)
        workers = [Worker(f"worker-{i + 1}", port) for i, port in enumerate(ports)]
        for worker in workers:
            start_worker(group, worker, args)
        url = start_vpool(group, workers, log_dir, args.base_port)
        started = time.monotonic()
        tally = asyncio.run(soak(url, group, workers, args))
        elapsed = time.monotonic() - started
    total = sum(tally.outcomes.values())
    print(f"\n{total:,} requests in {elapsed:.0f} s, {tally.kills} worker kills")
    for outcome in ("completed", "openai_error", "lost"):
        print(f"  {outcome:<13} {tally.outcomes[outcome]:>8,}")
    for example in tally.lost_examples:
        print(f"  lost: {example}")
    return 1 if tally.outcomes["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
