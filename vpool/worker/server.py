"""One worker process: an engine, vLLM's OpenAI app over it, and its life with the controller.

Start: load the engine, bind the socket, serve, then register (the controller probes
`/health` before it marks the worker READY). SIGTERM: ask the controller to mark us
DRAINING, wait until gateways have seen it, stop accepting, finish in-flight requests
(streams included), deregister, shut the engine down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from vpool.background import cancel_and_wait
from vpool.config import ModelSpec
from vpool.registry.records import Registration
from vpool.worker.engine_guard import DeadEngineGuard
from vpool.worker.model_source import pick_dtype, resolve_model_path
from vpool.worker.registration import ControllerClient, keep_registered

log = logging.getLogger("vpool.worker")


@dataclass
class WorkerOptions:
    spec: ModelSpec
    controller_url: str | None
    registration_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    advertise_url: str | None = None
    worker_id: str | None = None
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "vpool")
    # Long enough for every gateway to refresh its view and stop sending us work.
    drain_delay_s: float = 2.0
    drain_timeout_s: float = 300.0
    # Launched by `vpool up`/`vpool controller`: drain and exit if that parent dies, so a
    # killed launcher never leaves engines holding memory behind.
    exit_with_parent: bool = False


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before it stops accepting."""

    def __init__(self, config: uvicorn.Config, on_first_signal: asyncio.Event) -> None:
        super().__init__(config)
        self._on_first_signal = on_first_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_first_signal.is_set():
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._on_first_signal.set()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _advertised(host: str, port: int, advertise_url: str | None) -> str:
    if advertise_url:
        return advertise_url.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


async def run_worker(options: WorkerOptions) -> int:
    """Serve one engine until SIGTERM, registered with the controller if one is given.

    Returns the exit code: 0 after a drain, 1 when the engine died under us (a launcher
    then starts a fresh worker).
    """
    from vpool.worker.vllm_adapter import cpu_has_bf16, cuda_capability, open_engine

    spec = options.spec
    model_path = resolve_model_path(spec.model, options.cache_dir)
    dtype = pick_dtype(spec.dtype, cuda_capability(), cpu_has_bf16())
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    url = _advertised(options.host, port, options.advertise_url)
    worker_id = options.worker_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    log.info("loading %s (%s) for %s on %s", spec.name, model_path, worker_id, url)

    async with open_engine(spec, model_path, dtype) as engine:
        stop_requested = asyncio.Event()
        config = uvicorn.Config(
            DeadEngineGuard(engine.app, engine.engine_dead),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(options.drain_timeout_s),
            timeout_keep_alive=30,
        )
        server = _DrainingServer(config, stop_requested)
        # vLLM's handler for a dead engine stops this server (it looks for it here).
        engine.app.state.server = server
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():
            await serving  # raises what made uvicorn fail to start
            return 1

        client = (
            ControllerClient(options.controller_url, options.registration_token)
            if options.controller_url
            else None
        )
        heartbeats: asyncio.Task[None] | None = None
        if client is not None:
            registration = Registration(
                worker_id=worker_id,
                url=url,
                models=spec.served_names,
                model_path=model_path,
                runner=spec.runner,
                tensor_parallel_size=spec.tensor_parallel_size,
                pipeline_parallel_size=spec.pipeline_parallel_size,
                max_model_len=engine.max_model_len,
                max_num_seqs=engine.max_num_seqs,
            )
            heartbeats = asyncio.create_task(keep_registered(client, registration, engine.read_load))
        print(f"vpool worker {worker_id} serving {spec.name} on {url}", flush=True)

        orphaned = _orphaned() if options.exit_with_parent else (lambda: False)
        watchers = [
            asyncio.create_task(stop_requested.wait()),
            asyncio.create_task(_wait_until(engine.engine_dead)),
            asyncio.create_task(_wait_until(orphaned)),
        ]
        await asyncio.wait({serving, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        for watcher in watchers:
            watcher.cancel()
        if heartbeats is not None:
            await cancel_and_wait(heartbeats)
        engine_died = engine.engine_dead()
        if engine_died:
            # Nothing in flight can finish: leave routing at once rather than drain.
            log.error("the vLLM engine of %s died: leaving the fleet and exiting", worker_id)
            server.should_exit = True
            await serving
        elif not serving.done():
            if orphaned():
                log.warning("the launcher that started %s is gone: draining and exiting", worker_id)
            await _drain(server, serving, client, worker_id, options.drain_delay_s)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.deregister(worker_id)
            await client.aclose()
        log.info("worker %s stopped", worker_id)
        return 1 if engine_died else 0


async def _wait_until(condition: Callable[[], bool], interval_s: float = 0.5) -> None:
    while not condition():
        await asyncio.sleep(interval_s)


def _orphaned() -> Callable[[], bool]:
    """True once the process that started us is gone (we were re-parented)."""
    parent = os.getppid()
    return lambda: os.getppid() != parent


async def _drain(
    server: uvicorn.Server,
    serving: asyncio.Task[None],
    client: ControllerClient | None,
    worker_id: str,
    delay_s: float,
) -> None:
    log.info("draining %s: no new work, finishing in-flight requests", worker_id)
    if client is not None:
        try:
            await client.drain(worker_id)
            await asyncio.sleep(delay_s)
        except Exception as exc:  # the controller may be gone: drain all the same
            log.warning("could not tell the controller we drain: %s", exc)
    server.should_exit = True  # uvicorn stops accepting and waits for open requests
    await serving
