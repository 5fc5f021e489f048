"""What wrk cannot see inside a stream: time to first event and the gaps between events.

wrk times a stream to its last byte. A gateway that buffered a stream and sent it in one
piece would score the same there, yet a chat user would see nothing until the end. This
client reads each stream as it arrives and times every SSE event.

Two modes, as functions (`measure_streams`, `open_streams`) and as a command:

    # 32 streams at a time for 5 s: TTFE and inter-event gap p50/p99
    python benchmarks/stream_client.py http://127.0.0.1:8100 --concurrency 32 --duration 5

    # open 10,000 streams at once and hold them (the backend must stream slowly:
    # stub_backend.py --event-delay-ms 1000); PID: the gateway, for its memory
    python benchmarks/stream_client.py http://127.0.0.1:8100 --open-streams 10000 --pid PID

`open_streams.py` starts the stub and a gateway and runs the second mode for you.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import aiohttp
from cases import CASES, MODEL
from processes import raise_open_files, rss_kib

T = TypeVar("T")
PATH = "/v1/chat/completions"


class StreamError(RuntimeError):
    """A stream that did not end well: bad status, no `[DONE]`, a broken connection."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class SseEvents:
    """Split a byte stream into SSE `data:` payloads as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        # Normalising on the joined buffer also catches a CRLF split across two chunks.
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [
            line[5:].strip() for event in events for line in event.split(b"\n") if line.startswith(b"data:")
        ]


@dataclass
class StreamTiming:
    ttfe_s: float
    gaps_s: list[float]
    events: int


async def read_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, on_open: Callable[[], None] | None = None
) -> StreamTiming:
    """POST one streaming request and time each event; StreamError unless it ends in [DONE]."""
    start = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            text = (await response.read())[:200]
            raise StreamError(f"status {response.status}: {text!r}")
        if on_open is not None:
            on_open()
        parser = SseEvents()
        done = False
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            for payload in parser.feed(chunk):
                if payload == b"[DONE]":
                    done = True
                else:
                    arrivals.append(now)
    if not done:
        raise StreamError("stream ended without `data: [DONE]`")
    if not arrivals:
        raise StreamError("no event before `data: [DONE]`")
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    return StreamTiming(arrivals[0] - start, gaps, len(arrivals))


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, StreamError) else f"{type(error).__name__}: {text}"[:160]


# ---------------------------------------------------------------------------------------------
# N streams at a time for D seconds


@dataclass
class StreamStats:
    concurrency: int
    seconds: float
    streams: int
    errors: int
    events_per_stream: float
    ttfe_p50_ms: float
    ttfe_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    error_examples: list[str] = field(default_factory=list)


async def measure_streams(
    base_url: str, concurrency: int, seconds: float, model: str = MODEL, read_timeout_s: float = 30.0
) -> StreamStats:
    """`concurrency` clients, each starting a new stream as soon as its last one ended."""
    body = json.dumps({**CASES["stream"].body, "model": model}).encode()
    url = base_url + PATH
    timings: list[StreamTiming] = []
    errors: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    deadline = started + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            try:
                timings.append(await read_stream(session, url, body))
            except (TimeoutError, StreamError, aiohttp.ClientError, OSError) as error:
                errors[_describe(error)] += 1
                await asyncio.sleep(0.05)  # a refused connection must not spin

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ttfe = [t.ttfe_s * 1000 for t in timings]
    gaps = [g * 1000 for t in timings for g in t.gaps_s]
    return StreamStats(
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        streams=len(timings),
        errors=sum(errors.values()),
        events_per_stream=sum(t.events for t in timings) / len(timings) if timings else 0.0,
        ttfe_p50_ms=percentile(ttfe, 50),
        ttfe_p99_ms=percentile(ttfe, 99),
        gap_p50_ms=percentile(gaps, 50),
        gap_p99_ms=percentile(gaps, 99),
        error_examples=[f"{n} x {text}" for text, n in errors.most_common(3)],
    )


# ---------------------------------------------------------------------------------------------
# N streams open at once


@dataclass
class OpenStreamsReport:
    requested: int
    opened: int  # answered 200 and began streaming
    peak_open: int  # open at the same moment
    completed: int  # ended with [DONE]
    errors: int
    seconds_to_peak: float
    seconds: float
    rss_before_kib: int | None
    rss_peak_kib: int | None
    rss_after_kib: int | None
    error_examples: list[str] = field(default_factory=list)


async def open_streams(
    base_url: str, count: int, pid: int | None = None, model: str = MODEL, timeout_s: float = 600.0
) -> OpenStreamsReport:
    """Open `count` streams at once, hold them to their end; sample `pid`'s memory meanwhile."""
    raise_open_files(count + 1024)
    body = json.dumps({**CASES["stream"].body, "model": model}).encode()
    url = base_url + PATH
    errors: Counter[str] = Counter()
    state = {"open": 0, "opened": 0, "peak": 0, "completed": 0}
    started = time.perf_counter()
    peak_at = started
    rss_before = rss_kib(pid) if pid else None
    rss_peak = rss_before

    def opened() -> None:
        nonlocal peak_at
        state["open"] += 1
        state["opened"] += 1
        if state["open"] > state["peak"]:
            state["peak"], peak_at = state["open"], time.perf_counter()

    async def one(session: aiohttp.ClientSession) -> None:
        was_open = False

        def on_open() -> None:
            nonlocal was_open
            was_open = True
            opened()

        try:
            await read_stream(session, url, body, on_open=on_open)
            state["completed"] += 1
        except (TimeoutError, StreamError, aiohttp.ClientError, OSError) as error:
            errors[_describe(error)] += 1
        finally:
            if was_open:
                state["open"] -= 1

    async def sample_memory(stop: asyncio.Event) -> None:
        nonlocal rss_peak
        while not stop.is_set() and pid:
            rss = rss_kib(pid)
            if rss is not None and (rss_peak is None or rss > rss_peak):
                rss_peak = rss
            await asyncio.sleep(0.25)

    # Connecting thousands at once overflows the listen backlog; the kernel retries the SYNs
    # after 1, 3, 7 s, so connects get a long timeout, and reads one as long as the stream.
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=60)
    connector = aiohttp.TCPConnector(limit=0)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_memory(stop))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    stop.set()
    await sampler
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let the gateway close its side before the last reading
    return OpenStreamsReport(
        requested=count,
        opened=state["opened"],
        peak_open=state["peak"],
        completed=state["completed"],
        errors=sum(errors.values()),
        seconds_to_peak=round(peak_at - started, 2),
        seconds=round(elapsed, 2),
        rss_before_kib=rss_before,
        rss_peak_kib=rss_peak,
        rss_after_kib=rss_kib(pid) if pid else None,
        error_examples=[f"{n} x {text}" for text, n in errors.most_common(3)],
    )


def format_open_streams(report: OpenStreamsReport) -> str:
    def mib(kib: int | None) -> str:
        return "-" if kib is None else f"{kib / 1024:.1f} MiB"

    lines = [
        f"streams requested   {report.requested}",
        f"opened (200)        {report.opened}",
        f"open at once, peak  {report.peak_open}  (after {report.seconds_to_peak} s)",
        f"completed [DONE]    {report.completed}",
        f"errors              {report.errors}",
        f"wall time           {report.seconds} s",
        f"gateway RSS         before {mib(report.rss_before_kib)}, peak {mib(report.rss_peak_kib)}, "
        f"after {mib(report.rss_after_kib)}",
    ]
    if report.rss_before_kib and report.rss_peak_kib and report.peak_open:
        per_stream = (report.rss_peak_kib - report.rss_before_kib) / report.peak_open
        lines.append(f"memory per open stream  {per_stream:.1f} KiB")
    lines += [f"  {example}" for example in report.error_examples]
    return "\n".join(lines)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed: the client must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="base URL of the gateway, e.g. http://127.0.0.1:8100")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--concurrency", type=int, default=32, help="streams at a time")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds to keep starting streams")
    parser.add_argument("--open-streams", type=int, metavar="N", help="open N streams at once instead")
    parser.add_argument("--pid", type=int, help="the gateway's pid, to report its memory (--open-streams)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    base = args.url.rstrip("/")
    if args.open_streams:
        report = run(open_streams(base, args.open_streams, args.pid, args.model))
        print(json.dumps(asdict(report), indent=2) if args.json else format_open_streams(report))
        return
    stats = run(measure_streams(base, args.concurrency, args.duration, args.model))
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
        return
    print(
        f"{stats.streams} streams ({stats.events_per_stream:.1f} events each), {stats.errors} errors, "
        f"{stats.concurrency} at a time for {stats.seconds} s\n"
        f"time to first event  p50 {stats.ttfe_p50_ms:.2f} ms  p99 {stats.ttfe_p99_ms:.2f} ms\n"
        f"gap between events   p50 {stats.gap_p50_ms:.3f} ms  p99 {stats.gap_p99_ms:.3f} ms"
    )
    for example in stats.error_examples:
        print(f"  {example}")


if __name__ == "__main__":
    main()
