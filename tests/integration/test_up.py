"""`vpool up` with no arguments, as the README tells a new user to run it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support.processes import free_port

pytestmark = pytest.mark.integration


def test_up_serves_the_default_models_and_stops_cleanly(tmp_path: Path) -> None:
    port, controller_port = free_port(), free_port()
    env = {**os.environ, "VPOOL_CONTROLLER__PORT": str(controller_port), "COLUMNS": "200"}
    env.pop("VPOOL_API_KEYS", None)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "vpool.cli", "up", "--port", str(port), "--cache-dir", str(tmp_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 600
        while "vpool is ready" not in log_path.read_text(errors="replace"):
            assert up.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "vpool up did not get ready in time"
            time.sleep(1)
        shown = log_path.read_text(errors="replace")
        base_url = f"http://127.0.0.1:{port}/v1"
        assert base_url in shown
        assert "tiny-chat" in shown and "all-MiniLM-L6-v2" in shown
        assert "gateway is open" in shown

        with OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            assert {m.id for m in client.models.list().data} == {"tiny-chat", "all-MiniLM-L6-v2"}
            reply = client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
            )
            assert reply.choices[0].message.content is not None
            vector = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello").data[0].embedding
            assert len(vector) == 384
            assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-3)
        assert (tmp_path / "models").is_dir()  # tiny-chat was generated in the cache dir

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base_url}/models", timeout=2)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
