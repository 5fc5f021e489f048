"""The gateway as a real process: several on one port, and what SIGTERM does."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.split_fleet import SplitFleet, listeners, split_fleet
from tests.support.stub_worker import StubWorker
from tests.unit.conftest import MODEL

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _exit_code(fleet: SplitFleet, timeout_s: float = 15) -> int:
    try:
        return fleet.gateway.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway was still running {timeout_s} s after SIGTERM:\n{fleet.gateway_log()}")


def _refuses_connections_within(url: str, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
        except httpx.ConnectError:
            return True
        except httpx.ReadError as exc:
            # Connected in the instant the listener closed: the kernel resets what was left
            # in its accept queue. Refused too, as a client sees it.
            if "Connection reset" in str(exc):
                return True
            raise
        time.sleep(0.05)
    return False


@pytest.fixture
def endpoint() -> Iterator[StubWorker]:
    stub = StubWorker("endpoint", events=8, event_interval_s=0.25)
    with stub.running():
        yield stub


def test_gateway_processes_share_the_port_serve_and_stop_on_sigterm(
    endpoint: StubWorker, tmp_path: Path
) -> None:
    with split_fleet(endpoint.url, MODEL, tmp_path, processes=2) as fleet:
        pids = {line.split("pid=")[1].split(",")[0] for line in listeners(fleet.port)}
        assert len(pids) == 2
        with httpx.Client(timeout=10) as client:
            answers = [client.post(fleet.url + "/v1/chat/completions", json=BODY) for _ in range(5)]
        assert all(a.status_code == 200 for a in answers)
        fleet.gateway.send_signal(signal.SIGTERM)
        assert _exit_code(fleet) == 0


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_connections(
    endpoint: StubWorker, tmp_path: Path
) -> None:
    """8 events 0.5 s apart: the stream is still open when SIGTERM lands."""
    endpoint.event_interval_s = 0.5
    with split_fleet(endpoint.url, MODEL, tmp_path) as fleet:
        received: list[bytes] = []
        streaming = threading.Event()

        def stream() -> None:
            chunks = []
            body = {**BODY, "stream": True}
            with (
                httpx.Client(timeout=30) as client,
                client.stream("POST", fleet.url + "/v1/chat/completions", json=body) as resp,
            ):
                for chunk in resp.iter_raw():
                    chunks.append(chunk)
                    streaming.set()
            received.append(b"".join(chunks))

        reader = threading.Thread(target=stream)
        reader.start()
        assert streaming.wait(10), "the stream never started"
        fleet.gateway.send_signal(signal.SIGTERM)
        assert _refuses_connections_within(fleet.url, 5.0)
        assert reader.is_alive()  # refused while our stream was still open
        reader.join(15)
        assert received and received[0].endswith(b"data: [DONE]\n\n")
        assert received[0].count(b"data: ") == 9
        assert _exit_code(fleet) == 0
