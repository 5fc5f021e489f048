"""The one module that calls into vLLM internals (pinned to vLLM 0.32).

vLLM moves `vllm.entrypoints.*` between releases; everything that depends on where things
live today is here, so an upgrade touches one file. The worker gets back vLLM's own
OpenAI app (full parity: tools, logprobs, response_format, n, stop, chat templates) and a
function that reads the engine's load for heartbeats.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from vpool.config import ModelSpec
from vpool.registry.records import WorkerLoad


@dataclass
class EngineApp:
    """vLLM's OpenAI app over a live engine, and a reader of that engine's load."""

    app: FastAPI
    read_load: Callable[[], WorkerLoad]
    # True once the engine-core process has died: nothing this worker serves can succeed.
    engine_dead: Callable[[], bool]
    # The longest context the engine takes, as vLLM settled it (from the model's config or
    # `--max-model-len`).
    max_model_len: int
    # The most requests the engine runs at once (its scheduler's `max_num_seqs`): gateways
    # hold requests past it in their fair-share queues (vpool/gateway/fair_share.py).
    max_num_seqs: int


class _LoadProbe:
    """A vLLM stat logger that keeps the latest scheduler stats for our heartbeats, and adds up
    the engine's prefix-cache counters the way vLLM's Prometheus logger does."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        # Totals since the engine started. Each step's `prefix_cache_stats` holds only what
        # that step looked up (vLLM hands it over and starts a new one), and a prefix-cache
        # reset does not reset these: like `vllm:prefix_cache_queries_total`, they only grow.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        probe = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    probe.record(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder(vllm_config, engine_index)

    def record(self, scheduler_stats: Any) -> None:
        """Take one engine step's `vllm.v1.metrics.stats.SchedulerStats`."""
        self.running = scheduler_stats.num_running_reqs
        self.waiting = scheduler_stats.num_waiting_reqs
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        # Requests resumed after a preemption are counted apart (`preempted_*`) and, as in
        # vLLM's own counters, left out: their second lookup would count their prompt twice.
        prefix = scheduler_stats.prefix_cache_stats
        if prefix is not None:
            self.prefix_cache_queries += prefix.queries
            self.prefix_cache_hits += prefix.hits

    def load(self, unfinished: int) -> WorkerLoad:
        # Scheduler stats arrive only with engine steps, so an engine that just went idle
        # still shows its last busy step; the count of unfinished requests bounds them.
        running = min(self.running, unfinished)
        waiting = min(self.waiting, unfinished - running)
        kv = min(max(self.kv_cache_usage, 0.0), 1.0)
        return WorkerLoad(
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )


def vllm_cli_args(spec: ModelSpec, model_path: str, dtype: str) -> list[str]:
    """Translate a catalog entry into `vllm serve` flags, so vLLM's own parser validates them."""
    argv = [
        "--model", model_path,
        "--served-model-name", *spec.served_names,
        "--runner", spec.runner,
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--pipeline-parallel-size", str(spec.pipeline_parallel_size),
        "--dtype", dtype,
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.chat_template is not None:
        argv += ["--chat-template", str(spec.chat_template)]
    if spec.distributed_executor_backend is not None:
        # "ray": vLLM's Ray executor calls `ray.init()`, which joins the cluster RAY_ADDRESS names.
        argv += ["--distributed-executor-backend", spec.distributed_executor_backend]
    for key, value in spec.engine_args.items():
        argv += _flag(key, value)
    return argv


def _flag(key: str, value: Any) -> list[str]:
    name = "--" + key.replace("_", "-")
    if value is True:
        return [name]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    if value is None:
        return []
    if isinstance(value, dict):
        return [name, json.dumps(value)]
    if isinstance(value, list | tuple):
        return [name, *[str(v) for v in value]]
    return [name, str(value)]


def parse_vllm_args(argv: list[str]) -> Any:
    """Parse with vLLM's own serve parser; raises SystemExit/ValueError on a bad flag."""
    from vllm.entrypoints.launchers.cli_args import (
        make_arg_parser,
        validate_parsed_serve_args,
    )
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vpool worker (vLLM engine)"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def cuda_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability, or None where there is no CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return (int(major), int(minor))


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX-512 BF16 or AMX)."""
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported())
    except (ImportError, AttributeError):
        return False


@asynccontextmanager
async def open_engine(spec: ModelSpec, model_path: str, dtype: str) -> AsyncIterator[EngineApp]:
    """Start an in-process engine with vLLM's OpenAI app over it; shut it down on exit."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    cli_env_setup()
    if cuda_capability() is None:
        # vLLM's CPU backend pins each engine's compute thread to the first core ("auto"):
        # several engines on one host then all fight over core 0 and starve everything
        # else on it (Redis answered in 1.4 s instead of 0.2 s here). Let the OS place them.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    args = parse_vllm_args(vllm_cli_args(spec, model_path, dtype))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    usage = UsageContext.OPENAI_API_SERVER
    vllm_config = engine_args.create_engine_config(usage_context=usage)
    probe = _LoadProbe()
    engine = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=usage,
        stat_loggers=[probe.factory],
        # Our probe alone: vLLM's periodic log lines would flood a worker's log.
        disable_log_stats=True,
    )
    try:
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)

        def read_load() -> WorkerLoad:
            return probe.load(engine.get_num_unfinished_requests())

        async def load_now() -> dict[str, Any]:
            """The engine's load this instant (heartbeats carry it once a second)."""
            return {**read_load().model_dump(), "unfinished": engine.get_num_unfinished_requests()}

        app.add_api_route("/vpool/load", load_now, methods=["GET"])
        yield EngineApp(
            app=app,
            read_load=read_load,
            engine_dead=lambda: engine.errored,
            max_model_len=int(engine.model_config.max_model_len),
            max_num_seqs=int(vllm_config.scheduler_config.max_num_seqs),
        )
    finally:
        engine.shutdown()
