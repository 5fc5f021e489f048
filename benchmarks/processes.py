"""Start the processes under test, pinned to a core, logged to a file, and always stopped.

A benchmark that leaves a gateway running spoils the next one (a busy core, a taken port),
so every process is started through a `ProcessGroup`, which stops all of them on the way
out, Ctrl-C and failures included. Each child runs in a session of its own: the terminal's
Ctrl-C reaches only the benchmark, which then stops the children in order, instead of
every process dying at once mid-measurement.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

STOP_GRACE_S = 5.0


class StartupError(RuntimeError):
    """A process exited or did not become ready; the message carries its log's tail."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Every process a benchmark started; leaving the `with` block stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._processes: list[Process] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process in reversed(self._processes):
            self.stop(process)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        """Start `argv` on core `cpu` (None: anywhere), output to `<log_dir>/<name>.log`."""
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [*pin(cpu), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self._processes.append(process)
        where = "any core" if cpu is None else f"core {cpu}"
        print(f"  started {name} (pid {popen.pid}, {where}), log: {log}", flush=True)
        return process

    def stop(self, process: Process) -> None:
        """SIGTERM the process's whole session, SIGKILL what is left after a grace period."""
        if process not in self._processes:
            return
        self._processes.remove(process)
        if process.alive():
            _signal_session(process.popen, signal.SIGTERM)
            try:
                process.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"  {process.name} ignored SIGTERM for {STOP_GRACE_S:.0f} s: killing it", flush=True)
        # Helpers a process started (LiteLLM's, a launcher's child) share its session.
        _signal_session(process.popen, signal.SIGKILL)
        process.popen.wait()


def _signal_session(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def wait_until(process: Process, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready()` until it holds; fail early, with the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise StartupError(
                f"{process.name} exited with code {process.popen.returncode} before {what}; "
                f"log {process.log}:\n{log_tail(process.log)}"
            )
        if ready():
            return
        time.sleep(0.2)
    raise StartupError(
        f"{process.name} not {what} after {timeout_s:.0f} s; log {process.log}:\n{log_tail(process.log)}"
    )


# ---------------------------------------------------------------------------------------------
# Cores


def pin(cpu: int | None) -> list[str]:
    """The `taskset` prefix that pins a command to one core, or nothing."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def pinning_problem(cpus: Sequence[int]) -> str | None:
    """Why the cores cannot be pinned as asked, or None when they can."""
    if shutil.which("taskset") is None:
        return "taskset is not installed"
    available = os.sched_getaffinity(0)
    missing = [c for c in cpus if c not in available]
    if missing:
        return f"core(s) {missing} not available (this process may use {sorted(available)})"
    if len(set(cpus)) < len(cpus):
        return "the gateway and the load generator would share a core"
    return None


def pin_self(cpu: int | None) -> None:
    """Keep the benchmark's own Python work (the stream client) on the load generator's core."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------------------------------------
# Ports, file descriptors, memory


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int) -> list[int]:
    """The first `count` free ports from `start` up.

    A fixed range below the kernel's ephemeral range (32768+) keeps listening ports out of
    the way of the tens of thousands of client sockets an open-streams run makes.
    """
    ports: list[int] = []
    port = start
    while len(ports) < count:
        if port > 65535:
            raise StartupError(f"no {count} free ports from {start} up")
        if port_is_free(port):
            ports.append(port)
        port += 1
    return ports


def check_port_free(port: int, who: str) -> None:
    if not port_is_free(port):
        raise StartupError(f"port {port} for {who} is taken: stop what holds it (`ss -ltnp`) or pick another")


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by every child) to `wanted` if allowed; return the limit.

    Thousands of connections need thousands of descriptors in the client, the gateway (one
    downstream and one upstream socket per stream) and the backend; 1024 is a common default.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else max(hard, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, target))
    except (ValueError, OSError):
        # Raising the hard limit needs privilege; the soft one may still go up to it.
        capped = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (capped, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int | None:
    """Resident memory of `pid` and its descendants (a gateway may fork workers), from
    /proc/PID/status (VmRSS); None if `pid` is gone."""
    own = _own_rss_kib(pid)
    if own is None:
        return None
    return own + sum(_own_rss_kib(child) or 0 for child in _descendants(pid))


def _own_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            direct = [int(c) for c in children.read().split()]
    except OSError:
        return []
    return direct + [d for c in direct for d in _descendants(c)]


def cpu_seconds(pid: int) -> float | None:
    """CPU time `pid` has used, all threads, from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime fields 14 and 15 of proc(5).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout_s: float = 60.0, busy_share: float = 0.1, interval_s: float = 0.25) -> float:
    """Wait until `pid` uses less than `busy_share` of a core; return the seconds waited.

    When wrk stops, a slow gateway still holds the requests it had accepted (up to one per
    connection) and works through them; the next case must not start on that backlog.
    """
    started = time.monotonic()
    before = cpu_seconds(pid)
    while before is not None and time.monotonic() - started < timeout_s:
        time.sleep(interval_s)
        after = cpu_seconds(pid)
        if after is None or after - before < busy_share * interval_s:
            break
        before = after
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Signals


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind as Ctrl-C does, so the `finally` blocks stop the children."""

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
