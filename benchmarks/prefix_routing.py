"""Prefix routing on real vLLM CPU engines: does `prefix` land requests on cached prompts?

Two vLLM CPU workers (prefix caching on, one engine thread each, `nice 10`), their
controller, and one gateway per policy (`round_robin`, `least_outstanding`, `prefix`) over
the same Redis registry; the same two engines serve every policy. The model is a random-
weight Llama made here (the tiny model's tokenizer, a bigger config: `--hidden`,
`--layers`) so that prefill dominates the time to first token of a long prompt; its
prefill time for `--calibrate-tokens` tokens is measured on one idle engine and printed.

Traffic is open loop (Poisson arrivals at `--rate`, by default calibrated from that
measurement so the engines are busy but not overloaded), seeded, streamed chat requests of
`--max-tokens` tokens (`ignore_eos`), so prefill dominates:

- shared: 4 long system prompts, 8 users on each, multi-turn conversations that grow (each
  turn adds the user's message and a made-up assistant reply to the history);
- hot: the same, but 80 % of the requests on one system prompt (the collapse case);
- none: every prompt unique (where prefix routing must cost nothing).

Each cell (scenario x policy) sends the same schedule (same arrival times, users, lengths);
only a tag at the very start of every prompt differs, so no cell finds another's prompts in
a cache (vLLM chains its block hashes from the first token). The engines' prefix caches are
also reset between cells where the worker allows it (`VLLM_SERVER_DEV_MODE=1`), and each
worker's hit rate is the delta of its engine's own counters over the cell (vLLM's
`vllm:prefix_cache_{queries,hits}_total` on the worker's `/metrics`, else the same counters
on `/vpool/load`). Targets (issue 11): shared, TTFT p50 at least 1.5x better than
least-outstanding; hot, p99 TTFT no worse than least-outstanding's by more than 10 %; none,
within noise of least-outstanding.

    .venv/bin/python benchmarks/prefix_routing.py                     # ~11 minutes
    .venv/bin/python benchmarks/prefix_routing.py --duration 30 --json /tmp/pr.json
    .venv/bin/python benchmarks/prefix_routing.py --smoke             # plumbing check

Needs Redis (a key prefix of its own, deleted after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from engines import VPOOL, EngineWorker, forget_prefix, start_engine_worker
from processes import ProcessGroup, free_ports, wait_until
from stats import interpolated_percentile

from vpool.worker.tiny_model import make_sized_chat_model, token_counter

MODEL = "prefix-bench"
BASE_PORT = 18500
TOKEN = "bench-registration-token"
POLICIES = ("round_robin", "least_outstanding", "prefix")
SCENARIOS = ("shared", "hot", "none")
SHORT = {"round_robin": "RR", "least_outstanding": "LO", "prefix": "prefix"}


# --- the model ------------------------------------------------------------------------------


def engine_dtype() -> str:
    """What the workers run the model in (`--dtype auto`): bfloat16 where the CPU has it,
    else float32 (see vpool/worker/model_source.py `pick_dtype`)."""
    from vpool.worker.vllm_adapter import cpu_has_bf16

    return "bfloat16" if cpu_has_bf16() else "float32"


def kv_bytes_per_token(layers: int, kv_heads: int, dtype: str) -> int:
    """K and V of head_dim 64, in the engine's dtype: a float32 engine needs twice the bytes
    for the same `--kv-tokens`."""
    return 2 * layers * kv_heads * 64 * (4 if dtype == "float32" else 2)


# --- traffic --------------------------------------------------------------------------------


class Words:
    """Seeded English-ish text of about a given number of tokens (measured with the model's
    own tokenizer once, as characters per token)."""

    def __init__(self, model_dir: Path) -> None:
        import textwrap
        import unittest

        text = " ".join((m.__doc__ or "") for m in (argparse, asyncio, json, textwrap, unittest, os, shutil))
        self.words = sorted(set(re.findall(r"[A-Za-z]+", text)))
        count = token_counter(model_dir)
        sample = self.text(random.Random(0), 20000, chars_per_token=1.0)
        self.chars_per_token = len(sample) / count(sample)
        self.count = count

    def text(self, rng: random.Random, tokens: int, chars_per_token: float | None = None) -> str:
        want = int(tokens * (chars_per_token or self.chars_per_token))
        out: list[str] = []
        size = 0
        while size < want:
            word = rng.choice(self.words)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)

    def count(self, text: str) -> int:
        return self.count(text)


@dataclass
class Planned:
    at: float  # seconds after the cell starts
    messages: list[dict[str, str]]  # without the cell's tag


def plan(scenario: str, args: argparse.Namespace, words: Words) -> list[Planned]:
    """The cell's schedule: the same for every policy (seeded by scenario and --seed)."""
    rng = random.Random(f"{args.seed}-{scenario}")
    arrivals: list[float] = []
    t = rng.expovariate(args.rate)
    while t < args.duration:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    if scenario == "none":
        return [
            Planned(
                at,
                [
                    {"role": "system", "content": f"{i} " + words.text(rng, args.system_tokens)},
                    {"role": "user", "content": words.text(rng, args.user_tokens)},
                ],
            )
            for i, at in enumerate(arrivals)
        ]
    systems = [words.text(rng, args.system_tokens) for _ in range(args.prompts)]
    weights = [1.0] * args.prompts
    if scenario == "hot":
        weights = [args.hot_share] + [(1 - args.hot_share) / (args.prompts - 1)] * (args.prompts - 1)
    histories: dict[tuple[int, int], list[dict[str, str]]] = {}
    out = []
    for at in arrivals:
        prompt = rng.choices(range(args.prompts), weights)[0]
        user = (prompt, rng.randrange(args.users))
        history = histories.setdefault(user, [])
        if len(history) >= 2 * args.turns:  # the conversation is over: a new one starts
            history.clear()
        message = {"role": "user", "content": words.text(rng, args.user_tokens)}
        out.append(Planned(at, [{"role": "system", "content": systems[prompt]}, *history, message]))
        history += [message, {"role": "assistant", "content": words.text(rng, args.reply_tokens)}]
    return out


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Result:
    ttft_ms: float
    e2e_ms: float
    worker: str
    done_at: float


@dataclass
class Cell:
    scenario: str
    policy: str
    sent: int = 0
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # worker id -> (query tokens, hit tokens) over the cell, from the engine's counters
    cache: dict[str, tuple[int, int]] = field(default_factory=dict)
    cache_source: str = ""
    reset: bool = False

    def pct(self, what: str, q: float) -> float:
        return interpolated_percentile((getattr(r, what) for r in self.results), q)

    @property
    def rps(self) -> float:
        return len(self.results) / self.seconds if self.seconds else 0.0

    def shares(self) -> dict[str, int]:
        return dict(Counter(r.worker for r in self.results))


def body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }


async def stream_one(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, float, str]:
    """(ms to the first content chunk, ms to the end, the worker that served it)."""
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body(messages, max_tokens)) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        worker = resp.headers.get("x-vpool-worker", "")
        first = None
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
        end = time.perf_counter() - started
    return (first if first is not None else end) * 1000, end * 1000, worker


def tagged(messages: list[dict[str, str]], tag: str) -> list[dict[str, str]]:
    """The messages with `tag` at the very start of the first one: a prompt no other cell sent."""
    first = {**messages[0], "content": f"[{tag}] {messages[0]['content']}"}
    return [first, *messages[1:]]


async def run_cell(cell: Cell, url: str, schedule: list[Planned], args: argparse.Namespace, tag: str) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        start = time.perf_counter()

        async def one(p: Planned) -> None:
            await asyncio.sleep(max(0.0, start + p.at - time.perf_counter()))
            cell.sent += 1
            try:
                ttft, e2e, worker = await stream_one(client, url, tagged(p.messages, tag), args.max_tokens)
            except (httpx.HTTPError, RuntimeError) as exc:
                cell.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            cell.results.append(Result(ttft, e2e, worker, time.perf_counter() - start))

        await asyncio.gather(*(one(p) for p in schedule))
        cell.seconds = max((r.done_at for r in cell.results), default=0.0)


# --- the engines' counters ------------------------------------------------------------------


_METRIC = re.compile(r"^(vllm:prefix_cache_(queries|hits)_total)(\{[^}]*\})?\s+([0-9.eE+]+)$", re.M)


def counters(client: httpx.Client, worker_url: str) -> tuple[int, int, str]:
    """(prefix-cache query tokens, hit tokens, where read) since the engine started."""
    try:
        text = client.get(f"{worker_url}/metrics").text
        found = {"queries": 0.0, "hits": 0.0}
        seen = False
        for match in _METRIC.finditer(text):
            found[match.group(2)] += float(match.group(4))
            seen = True
        if seen and found["queries"] > 0:
            return int(found["queries"]), int(found["hits"]), "/metrics"
    except httpx.HTTPError:
        pass
    load = client.get(f"{worker_url}/vpool/load").json()
    return int(load["prefix_cache_queries"]), int(load["prefix_cache_hits"]), "/vpool/load"


def wait_idle(client: httpx.Client, worker_urls: dict[str, str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while any(client.get(f"{u}/vpool/load").json()["unfinished"] for u in worker_urls.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the engines did not go idle")
        time.sleep(0.2)


def reset_caches(client: httpx.Client, worker_urls: dict[str, str]) -> bool:
    ok = True
    for url in worker_urls.values():
        try:
            ok = client.post(f"{url}/reset_prefix_cache").status_code == 200 and ok
        except httpx.HTTPError:
            ok = False
    return ok


# --- processes ------------------------------------------------------------------------------


def serves_model(url: str) -> bool:
    try:
        data = httpx.get(f"{url}/v1/models", timeout=2).json().get("data", [])
    except (httpx.HTTPError, ValueError):
        return False
    return any(m.get("id") == MODEL for m in data)


def workers_ready(urls: list[str]) -> bool:
    try:
        return all(httpx.get(f"{u}/vpool/load", timeout=2).status_code == 200 for u in urls)
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def fleet(
    args: argparse.Namespace, work: Path, model_dir: Path, dtype: str
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """({policy: gateway URL}, {worker id: worker URL}); all stopped on the way out."""
    prefix = f"vpool-bench-pr-{uuid.uuid4().hex[:8]}"
    ports = free_ports(1 + len(POLICIES) + args.workers, BASE_PORT)
    controller_port, gateway_ports, worker_ports = (
        ports[0],
        ports[1 : 1 + len(POLICIES)],
        ports[1 + len(POLICIES) :],
    )
    config = work / "vpool.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "registry": {"url": args.redis_url, "key_prefix": prefix},
                "controller": {"port": controller_port, "registration_token": TOKEN},
                "models": [{"name": MODEL, "model": str(model_dir), "replicas": 0}],
                "cache_dir": str(work / "cache"),
                "gateway": {"refresh_interval_s": 0.5, "prefix_routing": yaml.safe_load(args.prefix_routing)},
            }
        )
    )
    env = {"VPOOL_REGISTRATION_TOKEN": TOKEN}
    vpool = VPOOL
    kv_bytes = args.kv_tokens * kv_bytes_per_token(args.layers, args.kv_heads, dtype)
    workers = {f"bench-w{i}": f"http://127.0.0.1:{p}" for i, p in enumerate(worker_ports)}
    gateways = {policy: f"http://127.0.0.1:{p}" for policy, p in zip(POLICIES, gateway_ports, strict=True)}
    try:
        with ProcessGroup(work) as group:
            group.start("controller", [*vpool, "controller", "--config", str(config)], env=env)
            engines = [
                start_engine_worker(
                    group,
                    EngineWorker(
                        worker_id=worker_id,
                        model_dir=model_dir,
                        served_name=MODEL,
                        port=port,
                        controller_url=f"http://127.0.0.1:{controller_port}",
                        cache_dir=work / "cache",
                        max_model_len=args.max_len,
                        engine_args={
                            "kv_cache_memory_bytes": str(kv_bytes),
                            "enable_prefix_caching": "true",
                            "max_num_seqs": str(args.max_num_seqs),
                        },
                        nice=args.engine_nice,
                        threads=args.engine_threads,
                    ),
                    {**env, "VLLM_SERVER_DEV_MODE": "1"},
                )
                for worker_id, port in zip(workers, worker_ports, strict=True)
            ]
            for policy, port in zip(POLICIES, gateway_ports, strict=True):
                argv = [*vpool, "gateway", "--config", str(config), "--port", str(port), "--routing", policy]
                group.start(f"gateway-{policy}", argv, env=env)
            for engine in engines:
                wait_until(engine, lambda: workers_ready(list(workers.values())), 900, "serving")
            for url in gateways.values():
                wait_until(engines[0], functools.partial(serves_model, url), 120, f"routed by {url}")
            time.sleep(3.0)  # a few heartbeats and refreshes: every gateway sees both workers
            yield gateways, workers
    finally:
        forget_prefix(args.redis_url, prefix)


# --- calibration ----------------------------------------------------------------------------


async def calibrate(worker_url: str, args: argparse.Namespace, words: Words) -> dict[str, float]:
    """One idle engine: TTFT and end-to-end of a unique `--calibrate-tokens` prompt, and TTFT of
    the same prompt again (all of it cached but the last block)."""
    rng = random.Random(f"{args.seed}-calibrate")
    uncached, e2e, cached = [], [], []
    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        for i in range(3):
            messages = [{"role": "user", "content": f"{i} " + words.text(rng, args.calibrate_tokens)}]
            ttft, end, _ = await stream_one(client, worker_url, messages, args.max_tokens)
            again, _, _ = await stream_one(client, worker_url, messages, args.max_tokens)
            if i:  # the first is a warm-up
                uncached.append(ttft)
                e2e.append(end)
                cached.append(again)
    tokens = words.count(messages[0]["content"])
    return {
        "prompt_tokens": tokens,
        "prefill_ms": sum(uncached) / len(uncached),
        "e2e_ms": sum(e2e) / len(e2e),
        "cached_ttft_ms": sum(cached) / len(cached),
    }


# --- report ---------------------------------------------------------------------------------


def hit_rate(queries: int, hits: int) -> str:
    return f"{100 * hits / queries:.0f} %" if queries else "-"


def report(
    cells: list[Cell], calib: dict[str, float], args: argparse.Namespace, workers: list[str]
) -> dict[str, Any]:
    lines = [
        f"Calibration (one idle engine): {calib['prompt_tokens']} prompt tokens, "
        f"TTFT {calib['prefill_ms']:.0f} ms "
        f"uncached, {calib['cached_ttft_ms']:.0f} ms cached; end to end {calib['e2e_ms']:.0f} ms "
        f"({args.max_tokens} tokens)",
        f"Rate {args.rate:.2f} requests/s for {args.duration:.0f} s a cell, seed {args.seed}",
        "",
        "| scenario | policy | sent | done/s | errors | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | "
        + " | ".join(f"{w} share | {w} hits" for w in workers)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(workers),
    ]
    for c in cells:
        shares = c.shares()
        total = sum(shares.values()) or 1
        per_worker = " | ".join(
            f"{100 * shares.get(w, 0) / total:.0f} % | {hit_rate(*c.cache.get(w, (0, 0)))}" for w in workers
        )
        lines.append(
            f"| {c.scenario} | {SHORT[c.policy]} | {c.sent} | {c.rps:.2f} | {len(c.errors)} | "
            f"{c.pct('ttft_ms', 50):.0f} | {c.pct('ttft_ms', 99):.0f} | {c.pct('e2e_ms', 50):.0f} | "
            f"{c.pct('e2e_ms', 99):.0f} | {per_worker} |"
        )
    by = {(c.scenario, c.policy): c for c in cells}
    targets: dict[str, Any] = {}
    lines.append("")
    if ("shared", "prefix") in by and ("shared", "least_outstanding") in by:
        ratio = by["shared", "least_outstanding"].pct("ttft_ms", 50) / by["shared", "prefix"].pct(
            "ttft_ms", 50
        )
        targets["shared_lo_over_prefix_ttft_p50"] = ratio
        lines.append(
            f"shared: LO TTFT p50 / prefix TTFT p50 = {ratio:.2f}x "
            f"(target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})"
        )
    if ("hot", "prefix") in by and ("hot", "least_outstanding") in by:
        ratio = by["hot", "prefix"].pct("ttft_ms", 99) / by["hot", "least_outstanding"].pct("ttft_ms", 99)
        targets["hot_prefix_over_lo_ttft_p99"] = ratio
        lines.append(
            f"hot: prefix TTFT p99 / LO TTFT p99 = {ratio:.2f}x "
            f"(target <= 1.10x: {'met' if ratio <= 1.1 else 'MISSED'})"
        )
    if ("none", "prefix") in by and ("none", "least_outstanding") in by:
        p50 = by["none", "prefix"].pct("ttft_ms", 50) / by["none", "least_outstanding"].pct("ttft_ms", 50)
        p99 = by["none", "prefix"].pct("ttft_ms", 99) / by["none", "least_outstanding"].pct("ttft_ms", 99)
        targets["none_prefix_over_lo_ttft_p50"], targets["none_prefix_over_lo_ttft_p99"] = p50, p99
        lines.append(f"none: prefix / LO TTFT p50 = {p50:.2f}x, p99 = {p99:.2f}x (target: within noise)")
    sources = sorted({c.cache_source for c in cells})
    resets = all(c.reset for c in cells)
    lines.append(
        f"hit rates from {', '.join(sources)}; prefix caches reset between cells: {'yes' if resets else 'NO'}"
    )
    for c in cells:
        for error in sorted(set(c.errors))[:3]:
            lines.append(f"  {c.scenario}/{SHORT[c.policy]} error: {error}")
    print("\n".join(lines), flush=True)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "calibration": calib,
        "cells": [
            {
                "scenario": c.scenario,
                "policy": c.policy,
                "sent": c.sent,
                "completed": len(c.results),
                "errors": len(c.errors),
                "seconds": c.seconds,
                "completed_per_s": c.rps,
                **{f"{w}_{q}": c.pct(w, q) for w in ("ttft_ms", "e2e_ms") for q in (50, 99)},
                "shares": c.shares(),
                "prefix_cache": {w: {"queries": q, "hits": h} for w, (q, h) in c.cache.items()},
                "cache_source": c.cache_source,
                "cache_reset": c.reset,
            }
            for c in cells
        ],
        "targets": targets,
    }


# --- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    began = time.monotonic()
    model_dir = make_sized_chat_model(work, args.hidden, args.layers, args.kv_heads, args.max_len)
    words = Words(model_dir)
    dtype = engine_dtype()
    print(f"  text: {words.chars_per_token:.2f} characters a token; engines in {dtype}", flush=True)
    with fleet(args, work, model_dir, dtype) as (gateways, worker_urls):
        print(f"  fleet up after {time.monotonic() - began:.0f} s", flush=True)
        calib = asyncio.run(calibrate(next(iter(worker_urls.values())), args, words))
        print(
            f"  prefill of {calib['prompt_tokens']} tokens: {calib['prefill_ms']:.0f} ms "
            f"(cached: {calib['cached_ttft_ms']:.0f} ms); a request end to end {calib['e2e_ms']:.0f} ms",
            flush=True,
        )
        if args.rate is None:
            # The heaviest scenario (none: every prompt computed whole) at `--load` of the workers.
            args.rate = round(args.load * len(worker_urls) / (calib["e2e_ms"] / 1000), 2)
        print(f"  rate {args.rate} requests/s", flush=True)
        cells: list[Cell] = []
        run_tag = uuid.uuid4().hex[:6]
        with httpx.Client(timeout=30) as client:
            for scenario in args.scenarios:
                schedule = plan(scenario, args, words)
                mean_tokens = sum(
                    words.count(" ".join(m["content"] for m in p.messages)) for p in schedule[:50]
                )
                mean_tokens //= max(1, min(50, len(schedule)))
                print(
                    f"  {scenario}: {len(schedule)} requests, ~{mean_tokens} prompt tokens each", flush=True
                )
                for policy in args.policies:
                    cell = Cell(scenario, policy)
                    url = gateways[policy]
                    # Warm this gateway's connections (short prompts: no key, no cache to speak of).
                    asyncio.run(_warm(url, args))
                    wait_idle(client, worker_urls)
                    cell.reset = reset_caches(client, worker_urls)
                    before = {w: counters(client, u) for w, u in worker_urls.items()}
                    asyncio.run(run_cell(cell, url, schedule, args, f"{run_tag}-{scenario}-{policy}"))
                    wait_idle(client, worker_urls)
                    time.sleep(0.5)
                    after = {w: counters(client, u) for w, u in worker_urls.items()}
                    cell.cache = {
                        w: (after[w][0] - before[w][0], after[w][1] - before[w][1]) for w in worker_urls
                    }
                    cell.cache_source = after[next(iter(worker_urls))][2]
                    cells.append(cell)
                    print(
                        f"    {SHORT[policy]}: {len(cell.results)}/{cell.sent} done, TTFT p50 "
                        f"{cell.pct('ttft_ms', 50):.0f} ms p99 {cell.pct('ttft_ms', 99):.0f} ms, shares "
                        f"{cell.shares()}, hits "
                        + ", ".join(f"{w} {hit_rate(*v)}" for w, v in cell.cache.items()),
                        flush=True,
                    )
    summary = report(cells, calib, args, list(worker_urls))
    summary["wall_s"] = time.monotonic() - began
    summary["engine_dtype"] = dtype
    print(f"wall time {summary['wall_s']:.0f} s")
    return summary


async def _warm(url: str, args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        for i in range(2):
            await stream_one(client, url, [{"role": "user", "content": f"hello {i}"}], 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per cell")
    parser.add_argument("--rate", type=float, help="requests a second (default: calibrated, see --load)")
    parser.add_argument(
        "--load", type=float, default=0.6, help="with no --rate: the workers' share busy on unshared prompts"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument("--smoke", action="store_true", help="a few requests per cell, a small model")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768, help="the model's hidden size (head_dim 64)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=4096, help="the engines' max_model_len")
    parser.add_argument(
        "--kv-tokens",
        type=int,
        default=16384,
        help="each engine's KV cache, in tokens (kv_cache_memory_bytes)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument(
        "--prefix-routing", default="{}", help="gateway.prefix_routing, YAML flow: '{by_conversation: true}'"
    )
    parser.add_argument("--prompts", type=int, default=4, help="system prompts (shared, hot)")
    parser.add_argument("--users", type=int, default=8, help="users per system prompt")
    parser.add_argument("--turns", type=int, default=6, help="turns before a user starts a new conversation")
    parser.add_argument("--hot-share", type=float, default=0.8)
    parser.add_argument("--system-tokens", type=int, default=1600)
    parser.add_argument("--user-tokens", type=int, default=80)
    parser.add_argument(
        "--reply-tokens", type=int, default=120, help="the made-up assistant replies in histories"
    )
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--calibrate-tokens", type=int, default=2000)
    parser.add_argument("--engine-threads", type=int, default=1)
    parser.add_argument("--engine-nice", type=int, default=10)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--log-dir", type=Path, help="keep the work directory (logs, model) here")
    parser.add_argument(
        "--redis-url", default=os.environ.get("VPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.hidden, args.layers = 4.0, 256, 2
        args.system_tokens, args.calibrate_tokens, args.users = 400, 500, 2
        args.rate = args.rate or 2.0  # a few requests a cell: the small model is too fast to calibrate on
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        summary = run(args, args.log_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="vpool-bench-pr-") as tmp:
            summary = run(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
