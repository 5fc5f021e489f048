"""Real vLLM CPU workers for the benchmarks that need engines (fair share, prefix routing).

On a small machine an engine left to take every core starves the gateway and the clients
of the very benchmark (stalls of a second were seen on 2 cores), so each runs under `nice`
with a fixed number of compute threads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import redis
from processes import Process, ProcessGroup

VPOOL = [sys.executable, "-m", "vpool.cli"]


@dataclass(frozen=True)
class EngineWorker:
    """One `vpool worker` on a local model directory, registering with a controller."""

    worker_id: str
    model_dir: Path
    served_name: str
    port: int
    controller_url: str
    cache_dir: Path
    max_model_len: int
    engine_args: dict[str, str] = field(default_factory=dict)
    nice: int = 10
    threads: int = 1


def start_engine_worker(group: ProcessGroup, spec: EngineWorker, env: dict[str, str]) -> Process:
    """Start `spec` in `group` (it registers once its engine is up); its process."""
    argv = [
        *VPOOL, "worker", "--worker-id", spec.worker_id, "--model", str(spec.model_dir),
        "--served-name", spec.served_name, "--port", str(spec.port),
        "--max-model-len", str(spec.max_model_len), "--controller", spec.controller_url,
        "--cache-dir", str(spec.cache_dir),
    ]  # fmt: skip
    for name, value in {"enforce_eager": "true", **spec.engine_args}.items():
        argv += ["--engine-arg", f"{name}={value}"]
    return group.start(
        spec.worker_id,
        ["nice", "-n", str(spec.nice), *argv],
        env={**env, "OMP_NUM_THREADS": str(spec.threads)},
    )


def forget_prefix(redis_url: str, prefix: str) -> None:
    """Remove what a benchmark's fleet wrote to Redis under `prefix:`."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()
