"""vpool against direct access and its peers: one command, one table.

Every system fronts the same stub backend (`stub_backend.py`, fast enough that the gateway
is the bottleneck) under the same load: each gateway alone on one core (`taskset -c 1`),
the stub and the load generator on the other (`taskset -c 0`), `wrk -t1 -cN` for a fixed
time per case. `direct` is wrk straight at the stub: the ceiling. Peers (vllm-router,
LiteLLM) are used when installed and skipped with a note when not.

    python benchmarks/compare.py                      # everything: ~2 min per system
    python benchmarks/compare.py --duration 2 --concurrency 1 32 --systems direct vpool
    python benchmarks/compare.py --smoke              # plumbing check, under 30 s
    python benchmarks/compare.py --baseline-ref ab28e32 --systems direct vpool   # + vpool-prev

Prints one table (rows: case x concurrency; per system: req/s, p50, p99, errors; then
vpool's throughput ratio and p50 difference to each other system) and a second one with
what happens inside a stream (time to first event, gaps). `--json-out` saves it all.
`--baseline-ref REF` adds `vpool-prev`, vpool at commit REF (from a temporary git worktree),
so `vpool/vpool-prev` gives the working tree's gateway against the previous one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cases import CASES, BadAnswer, preflight
from processes import (
    ProcessGroup,
    StartupError,
    free_ports,
    pin_self,
    raise_open_files,
    sigterm_as_interrupt,
    wait_idle,
)
from report import Key, results_table, streams_table
from stream_client import StreamStats, measure_streams, run
from systems import (
    BASELINE,
    PEERS,
    REPO,
    SYSTEMS,
    Launch,
    add_launch_options,
    baseline_checkout,
    cores,
    find_peer,
    log_directory,
    resolve_commit,
    start_backend,
    start_system,
)
from wrk_load import WrkResult, run_wrk, write_script, wrk_executable, wrk_version

STREAM_CONCURRENCY = 32
OPEN_FILES = 65536


@dataclass
class Plan:
    systems: list[str]
    cases: list[str]
    concurrencies: list[int]
    seconds: int
    warmup_s: int
    stream_seconds: float
    gateway_cpu: int | None
    load_cpu: int | None
    baseline_ref: str | None = None  # as given; `baseline_commit` is what it named at the start
    baseline_commit: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    results: dict[Key, WrkResult] = field(default_factory=dict)
    streams: dict[str, StreamStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, help="seconds per case (default 8; --smoke: 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="connections (default 1 32 256)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="default: all")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=[*SYSTEMS, BASELINE],
        help=f"default: all that are installed (+ {BASELINE} with --baseline-ref)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="1-second cases at concurrency 1 and 32, direct and vpool only"
    )
    parser.add_argument("--stream-seconds", type=float, help="stream client time per system (default 3)")
    parser.add_argument("--warmup", type=int, help="seconds of load before measuring a system (default 2)")
    parser.add_argument(
        "--baseline-ref", metavar="GIT_REF",
        help=f"also measure vpool at this commit as `{BASELINE}` (a temporary git worktree; "
        f"added after vpool if --systems does not name it)",
    )  # fmt: skip
    add_launch_options(parser)
    parser.add_argument("--json-out", type=Path, help="save plan, environment and results as JSON")
    args = parser.parse_args(argv)
    if args.systems and BASELINE in args.systems and not args.baseline_ref:
        parser.error(f"{BASELINE} needs --baseline-ref GIT_REF: the commit to measure")
    return args


def with_baseline(systems: list[str]) -> list[str]:
    """`systems` with `vpool-prev` added right after vpool (or last), so the two read side by side."""
    if BASELINE in systems:
        return systems
    at = systems.index("vpool") + 1 if "vpool" in systems else len(systems)
    return [*systems[:at], BASELINE, *systems[at:]]


def make_plan(args: argparse.Namespace) -> Plan:
    smoke = args.smoke
    gateway_cpu, load_cpu, pin_note = cores(args)
    systems = args.systems or (["direct", "vpool"] if smoke else list(SYSTEMS))
    return Plan(
        systems=with_baseline(systems) if args.baseline_ref else systems,
        cases=args.cases or list(CASES),
        concurrencies=args.concurrency or ([1, 32] if smoke else [1, 32, 256]),
        seconds=args.duration or (1 if smoke else 8),
        warmup_s=args.warmup if args.warmup is not None else (1 if smoke else 2),
        stream_seconds=args.stream_seconds or (1.0 if smoke else 3.0),
        gateway_cpu=gateway_cpu,
        load_cpu=load_cpu,
        baseline_ref=args.baseline_ref,
        baseline_commit=resolve_commit(args.baseline_ref) if args.baseline_ref else None,
        notes=[pin_note] if pin_note else [],
    )


def measure_system(system: str, launch: Launch, plan: Plan, scripts: dict[str, Path], out: Outcome) -> None:
    """Start one system, run every case and concurrency through it, stop it."""
    running = start_system(system, launch)

    def settle() -> str:
        waited = wait_idle(running.pid)
        return f"  (busy {waited:.1f} s after wrk stopped)" if waited > 1 else ""

    try:
        if plan.warmup_s:
            run_wrk(running.base_url + CASES["chat"].path, scripts["chat"], 32, plan.warmup_s, plan.load_cpu)
            settle()
        for name in plan.cases:
            case = CASES[name]
            try:
                preflight(running.base_url, case)
            except BadAnswer as error:
                out.notes.append(f"{system}: wrong answer, case not measured: {error}")
                out.failed = True
                for c in plan.concurrencies:
                    out.results[(name, c, system)] = WrkResult(0, 0, 0, 0, 0, problem=str(error))
                continue
            for c in plan.concurrencies:
                result = run_wrk(running.base_url + case.path, scripts[name], c, plan.seconds, plan.load_cpu)
                out.results[(name, c, system)] = result
                print(f"  {system:<12}{name:<11}c={c:<4} " + _summary(result) + settle(), flush=True)
                if result.problem:
                    out.failed = True
                elif not result.requests:
                    out.notes.append(f"{system} {name} c={c}: no answer within the {plan.seconds} s run")
        if "stream" in plan.cases:
            stats = run(measure_streams(running.base_url, STREAM_CONCURRENCY, plan.stream_seconds))
            out.streams[system] = stats
            print(
                f"  {system:<12}stream client: {stats.streams} streams, {stats.errors} errors, "
                f"TTFE p50 {stats.ttfe_p50_ms:.2f} ms",
                flush=True,
            )
    finally:
        if running.process is not None:
            launch.group.stop(running.process)


def _summary(result: WrkResult) -> str:
    if result.problem:
        return f"failed: {result.problem}"
    kinds = ", ".join(f"{k} {n}" for k, n in result.error_kinds.items())
    return (
        f"{result.rps:>9,.0f} req/s  p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  "
        f"{result.errors} errors" + (f" ({kinds})" if kinds else "")
    )


def run_comparison(plan: Plan, args: argparse.Namespace, log_dir: Path) -> Outcome:
    out = Outcome(notes=list(plan.notes))
    # The worktree is entered first, so it is removed after every process that runs from it.
    with contextlib.ExitStack() as stack:
        commit = plan.baseline_commit
        baseline = stack.enter_context(baseline_checkout(commit)) if commit else None
        group = stack.enter_context(ProcessGroup(log_dir))
        pin_self(plan.load_cpu)
        scripts = {name: write_script(CASES[name], log_dir) for name in {*plan.cases, "chat"}}
        (stub_port,) = free_ports(1, args.base_port)
        backend = start_backend(group, stub_port, plan.load_cpu)
        launch = Launch(
            group, backend, plan.gateway_cpu, args.base_port, args.peers_venv, args.gateway_processes,
            baseline=baseline,
        )  # fmt: skip
        for system in plan.systems:
            if system in PEERS and find_peer(system, args.peers_venv) is None:
                out.notes.append(
                    f"{system}: skipped, not installed (not in --peers-venv, on PATH or in .peers-venv; "
                    "see benchmarks/README.md)"
                )
                continue
            print(f"{system}:", flush=True)
            try:
                measure_system(system, launch, plan, scripts, out)
            except StartupError as error:
                out.notes.append(f"{system}: not measured: {error}")
                out.failed = True
    return out


def environment(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the figures."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed here"

    def peer_version(system: str, dist: str) -> str | None:
        executable = find_peer(system, args.peers_venv)
        if executable is None:
            return None
        found = sorted(executable.parent.parent.glob(f"lib/python*/site-packages/{dist}-*.dist-info"))
        return found[-1].name.removeprefix(f"{dist}-").removesuffix(".dist-info") if found else "unknown"

    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "vpool": f"{version('vpool')} ({commit or 'no git'})",
        BASELINE: f"{plan.baseline_ref} ({plan.baseline_commit})" if plan.baseline_commit else None,
        "vllm-router": peer_version("vllm-router", "vllm_router"),
        "litellm": peer_version("litellm", "litellm"),
        "wrk": wrk_version(),
    }


def save_json(path: Path, plan: Plan, env: dict[str, Any], out: Outcome) -> None:
    results = [
        {"case": case, "concurrency": c, "system": system, "rps": round(r.rps, 1), **asdict(r)}
        for (case, c, system), r in out.results.items()
    ]
    document = {
        "environment": env,
        "plan": asdict(plan),
        "results": results,
        "streams": {system: asdict(s) for system, s in out.streams.items()},
        "notes": out.notes,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except StartupError as error:  # a --baseline-ref that names no commit
        print(f"error: {error}", file=sys.stderr)
        return 2
    if wrk_executable() is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    open_files = raise_open_files(OPEN_FILES)
    log_dir = log_directory(args, "vpool-bench-")
    env = environment(args, plan)
    where = (
        "unpinned"
        if plan.gateway_cpu is None
        else f"gateway on core {plan.gateway_cpu}, stub + wrk + stream client on core {plan.load_cpu}"
    )
    print(
        f"vpool benchmark: {', '.join(plan.systems)}; cases {', '.join(plan.cases)}; "
        f"concurrency {' '.join(map(str, plan.concurrencies))}; {plan.seconds} s per case; {where}; "
        f"open files {open_files}; logs in {log_dir}",
        flush=True,
    )
    if plan.baseline_commit:
        print(f"{BASELINE}: vpool at {plan.baseline_ref} = {plan.baseline_commit}", flush=True)
    try:
        with sigterm_as_interrupt():
            out = run_comparison(plan, args, log_dir)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    except StartupError as error:  # the stub itself, or no free port
        print(f"error: {error}", file=sys.stderr)
        return 1
    measured = [s for s in plan.systems if any(k[2] == s for k in out.results)]
    print(
        f"\nwrk -t1, {plan.seconds} s per case; req/s counts answers below 400; latency to the last byte; "
        f"err: non-2xx/3xx + socket errors + timeouts; thr: vpool req/s / theirs; Δp50: vpool p50 - theirs"
    )
    table = results_table(out.results, plan.cases, plan.concurrencies, measured)
    print(table if measured else "nothing measured")
    if out.streams:
        print(
            f"\nstream case from inside (stream_client.py), {STREAM_CONCURRENCY} streams at a time, "
            f"{plan.stream_seconds:g} s per system: time to first event (TTFE), gap between events"
        )
        print(streams_table(out.streams))
    for note in out.notes:
        print(f"note: {note}")
    print(f"logs: {log_dir}")
    if args.json_out:
        save_json(args.json_out, plan, env, out)
        print(f"results: {args.json_out}")
    return 1 if out.failed else 0


if __name__ == "__main__":
    sys.exit(main())
