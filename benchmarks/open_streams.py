"""Hold ten thousand streams open through a gateway at once, and watch its memory.

A chat deployment's streams last seconds to minutes, so the number open at once, not the
request rate, is what runs a gateway out of memory or file descriptors. This starts the stub
with slow streams (`--event-delay-ms`: one event per delay), puts the gateway in front,
opens every stream at once with `stream_client.open_streams` and reports how many opened,
how many were open at the same moment, how many ended with `data: [DONE]`, and the
gateway's resident memory before, at the peak and after.

    python benchmarks/open_streams.py                         # 10,000 streams of 30 s
    python benchmarks/open_streams.py --streams 2000 --events 10 --system litellm

Each stream costs the gateway two sockets (client and backend side), so its open-files
limit must exceed twice the stream count; children inherit this script's limit, which it
raises as far as the machine allows and reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from processes import ProcessGroup, StartupError, free_ports, pin_self, raise_open_files, sigterm_as_interrupt
from stream_client import format_open_streams, open_streams, run
from systems import SYSTEMS, Launch, add_launch_options, cores, log_directory, start_backend, start_system


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10_000, help="streams to open at once")
    parser.add_argument("--events", type=int, default=30, help="events per stream")
    parser.add_argument("--event-delay-ms", type=float, default=1000.0, help="time between events")
    parser.add_argument("--system", choices=SYSTEMS, default="vpool")
    parser.add_argument("--json-out", type=Path)
    add_launch_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gateway_cpu, load_cpu, pin_note = cores(args)
    # Per gateway process: its share of the streams, two sockets each, plus headroom.
    per_process = -(-args.streams // args.gateway_processes) if args.system == "vpool" else args.streams
    wanted = 2 * per_process + 4096
    limit = raise_open_files(max(wanted, args.streams + 4096))
    log_dir = log_directory(args, "vpool-open-streams-")
    seconds = args.events * args.event_delay_ms / 1000
    print(
        f"{args.streams} streams of {args.events} events {args.event_delay_ms:g} ms apart "
        f"(~{seconds:g} s each) through {args.system}; open files {limit}; logs in {log_dir}",
        flush=True,
    )
    if limit < wanted:
        print(
            f"warning: open-files limit {limit} < {wanted}: the gateway may run out of descriptors "
            "(`Too many open files`); raising the hard limit needs CAP_SYS_RESOURCE "
            "(`ulimit -Hn 65536` as root), fewer --streams, or vpool --gateway-processes 2",
            flush=True,
        )
    if pin_note:
        print(f"note: {pin_note}")
    try:
        with sigterm_as_interrupt(), ProcessGroup(log_dir) as group:
            pin_self(load_cpu)
            (stub_port,) = free_ports(1, args.base_port)
            backend = start_backend(group, stub_port, load_cpu, args.events, args.event_delay_ms)
            running = start_system(
                args.system,
                Launch(group, backend, gateway_cpu, args.base_port, args.peers_venv, args.gateway_processes),
            )
            report = run(
                open_streams(running.base_url, args.streams, running.pid, timeout_s=seconds * 3 + 120)
            )
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_open_streams(report))
    print(f"logs: {log_dir}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"system": args.system, **asdict(report)}, indent=2) + "\n")
        print(f"results: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
