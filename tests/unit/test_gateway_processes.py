"""The gateway as a real process: several on one port, and what SIGTERM does."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.split_fleet import listeners, split_fleet
from tests.support.stub_worker import StubWorker
from tests.unit.conftest import MODEL

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


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
        assert fleet.gateway.wait(timeout=15) == 0


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_connections(
    endpoint: StubWorker, tmp_path: Path
) -> None:
    """8 events 0.25 s apart: the stream is still open when SIGTERM lands."""
    with split_fleet(endpoint.url, MODEL, tmp_path) as fleet:
        received: list[bytes] = []

        def stream() -> None:
            with httpx.Client(timeout=30) as client, client.stream(
                "POST", fleet.url + "/v1/chat/completions", json={**BODY, "stream": True}
            ) as resp:
                received.append(b"".join(resp.iter_raw()))

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.6)  # a few events in
        fleet.gateway.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.get(fleet.url + "/health", timeout=2)
        reader.join(15)
        assert received and received[0].endswith(b"data: [DONE]\n\n")
        assert received[0].count(b"data: ") == 9
        assert fleet.gateway.wait(timeout=15) == 0
