"""A real fleet for the whole session: Redis, a controller, two gateways, six vLLM engines.

Everything runs as it would for a team in split mode: separate processes started with the
`vpool` command, talking over real sockets, sharing a real Redis under a key prefix of
this session's own. Engines start once per session, all at once (about two minutes on
two cores), and every integration test shares them.

    tiny-chat     workers tiny-a, tiny-b       (replicas for the routing tests)
    tiny-chat-ha  workers ha-c, ha-d, ha-e     (one loses its engine, one is killed,
                                                one is drained)
    minilm        worker embed-f               (all-MiniLM-L6-v2, 384-d embeddings)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.processes import Proc, delete_redis_prefix, free_port, wait_http
from vpool.worker.tiny_model import ensure_tiny_chat_model

REDIS_URL = os.environ.get("VPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "test-registration-token"
API_KEY = "sk-test-key"
HEARTBEAT_S = 1.0  # the default; expiry: three missed heartbeats = 3 s
ENGINE_START_TIMEOUT_S = 600


@dataclass
class Fleet:
    controller_url: str
    gateway_urls: list[str]
    config_path: Path
    prefix: str  # the session's Redis key prefix: other controllers may join the same registry
    workers: dict[str, Proc] = field(default_factory=dict)
    others: list[Proc] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return self.gateway_urls[0]

    def admin_workers(self) -> list[dict]:
        resp = httpx.get(f"{self.controller_url}/v1/workers", headers={"Authorization": f"Bearer {TOKEN}"})
        resp.raise_for_status()
        return resp.json()["data"]


def _spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> Proc:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "vpool.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Proc(name, popen, log_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_chat_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    prefix = f"vpool-test-{uuid.uuid4().hex[:8]}"
    controller_port = free_port()
    gateway_ports = [free_port(), free_port()]
    config = {
        "gateway": {"api_keys": [API_KEY], "refresh_interval_s": 0.2},
        "registry": {"url": REDIS_URL, "key_prefix": prefix},
        "controller": {
            "port": controller_port,
            "registration_token": TOKEN,
            "heartbeat_interval_s": HEARTBEAT_S,
        },
        "models": [
            {"name": "tiny-chat", "model": str(tiny_model_dir), "replicas": 0},
            {"name": "tiny-chat-ha", "model": str(tiny_model_dir), "replicas": 0},
            {"name": "minilm", "model": "builtin:all-MiniLM-L6-v2", "replicas": 0},
        ],
        "cache_dir": str(work / "cache"),
    }
    config_path = work / "fleet.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # vLLM keeps `/v1/responses` results only with this set (in the engine's memory).
    env = {**os.environ, "VPOOL_REGISTRATION_TOKEN": TOKEN, "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    env.pop("VPOOL_API_KEYS", None)

    controller = _spawn("controller", ["controller", "--config", str(config_path)], work, env)
    controller_url = f"http://127.0.0.1:{controller_port}"
    gateways = [
        _spawn(f"gateway-{i}", ["gateway", "--config", str(config_path), "--port", str(p)], work, env)
        for i, p in enumerate(gateway_ports)
    ]
    fleet = Fleet(controller_url, [f"http://127.0.0.1:{p}" for p in gateway_ports], config_path, prefix)
    fleet.others = [controller, *gateways]
    try:
        wait_http(f"{controller_url}/health", controller)
        for proc, port in zip(gateways, gateway_ports, strict=True):
            wait_http(f"http://127.0.0.1:{port}/health", proc)

        chat = [
            "--model", str(tiny_model_dir), "--max-model-len", "1024",
            "--engine-arg", "kv_cache_memory_bytes=268435456", "--engine-arg", "enforce_eager=true",
            "--controller", controller_url, "--cache-dir", str(work / "cache"),
        ]  # fmt: skip
        # fmt: off
        plan = {
            "tiny-a": ["--served-name", "tiny-chat", *chat],
            # Its engine says how many requests it runs at once: gateways hold the rest (fair share).
            "tiny-b": ["--served-name", "tiny-chat", "--engine-arg", "max_num_seqs=32", *chat],
            "ha-c": ["--served-name", "tiny-chat-ha", *chat],
            "ha-d": ["--served-name", "tiny-chat-ha", "--drain-delay", "0.6", *chat],
            "ha-e": ["--served-name", "tiny-chat-ha", *chat],
            "embed-f": [
                "--model",
                "builtin:all-MiniLM-L6-v2",
                "--served-name",
                "minilm",
                "--runner",
                "pooling",
                "--dtype",
                "float32",
                "--gpu-memory-utilization",
                "0.05",
                "--engine-arg",
                "enforce_eager=true",
                "--controller",
                controller_url,
                "--cache-dir",
                str(work / "cache"),
            ],
        }
        # fmt: on
        for worker_id, args in plan.items():
            fleet.workers[worker_id] = _spawn(
                worker_id, ["worker", "--worker-id", worker_id, *args], work, env
            )
        _wait_ready(fleet, set(plan))
        yield fleet
    finally:
        for proc in [*fleet.workers.values(), *fleet.others]:
            proc.stop(signal.SIGTERM, timeout=30)
        delete_redis_prefix(REDIS_URL, prefix)


def _wait_ready(fleet: Fleet, worker_ids: set[str]) -> None:
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        for worker_id, proc in fleet.workers.items():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"worker {worker_id} exited while loading:\n{proc.log_tail()}")
        ready = {w["worker_id"] for w in fleet.admin_workers() if w["state"] == "READY"}
        if worker_ids <= ready:
            time.sleep(1)  # let every gateway refresh its view
            return
        time.sleep(1)
    raise RuntimeError(f"workers not ready in time: {worker_ids - ready}")


@pytest.fixture(scope="session")
def gateway_url(fleet: Fleet) -> str:
    return fleet.gateway_url


@pytest.fixture()
def client(fleet: Fleet) -> Iterator[object]:
    from openai import OpenAI

    with OpenAI(base_url=f"{fleet.gateway_url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture()
def http(fleet: Fleet) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=fleet.gateway_url, headers=headers, timeout=120) as h:
        yield h
