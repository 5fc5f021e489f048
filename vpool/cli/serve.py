"""`vpool up` (all in one), `vpool gateway`, `vpool controller`, `vpool worker`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from vpool.cli.common import (
    ConfigOpt,
    HostOpt,
    NoAuthOpt,
    PortOpt,
    RegistryOpt,
    RoutingOpt,
    app,
    model_from_flag,
    parse_engine_args,
    require_shared_registry,
    settings_from,
    start_logging,
)
from vpool.config import ModelSpec
from vpool.serving import run


@app.command()
def up(
    config: ConfigOpt = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Serve this model (local path or hub id) instead of the defaults. Repeatable.",
        ),
    ] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    no_auth: NoAuthOpt = False,
    routing: RoutingOpt = None,
    redis_url: RegistryOpt = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where generated models and worker logs go.")] = None,
) -> None:
    """Controller, gateway and local vLLM workers in one process: the quickest start.

    With no --config and no --model it serves two models that need no download:
    `tiny-chat` (a tiny random-weight Llama: it talks nonsense, it is for plumbing) and
    `all-MiniLM-L6-v2` (real sentence embeddings, 384 dimensions).
    """
    from vpool.console import make_console
    from vpool.embedded import DEFAULT_CATALOG, run_up
    from vpool.logs import setup_logging

    setup_logging(logging.WARNING)  # the console shows progress; logs only when wrong

    overrides: dict[str, Any] = {
        "gateway": {"host": host, "port": port, "no_auth": no_auth or None, "routing": routing},
        "registry": {"url": redis_url},
        "cache_dir": cache_dir,
    }
    settings = settings_from(config, overrides)
    if model:
        settings.models = [model_from_flag(m) for m in model]
    elif not settings.models and not settings.endpoints:
        settings.models = [spec.model_copy(deep=True) for spec in DEFAULT_CATALOG]
    raise typer.Exit(run(run_up(settings, make_console())))


@app.command()
def gateway(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    no_auth: NoAuthOpt = False,
    routing: RoutingOpt = None,
    redis_url: RegistryOpt = None,
    processes: Annotated[
        int | None,
        typer.Option(help="Gateway processes sharing the port (SO_REUSEPORT); default 1."),
    ] = None,
) -> None:
    """Run a gateway alone, reading the fleet from a shared Redis registry. Run several
    behind one load balancer: all shared state lives in Redis."""
    from vpool.gateway.processes import serve_gateway

    settings = settings_from(
        config,
        {
            "gateway": {
                "host": host,
                "port": port,
                "no_auth": no_auth or None,
                "routing": routing,
                "processes": processes,
            },
            "registry": {"url": redis_url},
        },
    )
    require_shared_registry(settings)
    start_logging()
    if settings.gateway.is_open:
        typer.secho(
            f"No API key configured: the gateway is open, on {settings.gateway.host} only.",
            fg="yellow",
        )
    g = settings.gateway
    typer.echo(f"vpool gateway on http://{g.host}:{g.port}/v1 ({g.processes} process(es))")
    raise typer.Exit(serve_gateway(settings))


@app.command()
def controller(
    config: ConfigOpt = None,
    host: Annotated[
        str | None, typer.Option(help="Address the controller binds (default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Controller port (default 8001).")] = None,
    redis_url: RegistryOpt = None,
    launch: Annotated[bool, typer.Option(help="Start the config's models as local worker processes.")] = True,
) -> None:
    """Run the controller: the worker registry's API, and the config's models launched locally."""
    from vpool.controller.service import run_controller

    settings = settings_from(
        config, {"controller": {"host": host, "port": port}, "registry": {"url": redis_url}}
    )
    require_shared_registry(settings)
    start_logging()
    raise typer.Exit(run(run_controller(settings, launch=launch)))


@app.command()
def worker(
    model: Annotated[str, typer.Option(help="Local path or hub id of the weights (or builtin:tiny-chat).")],
    controller: Annotated[str | None, typer.Option(help="Controller URL to register with.")] = None,
    served_name: Annotated[
        list[str] | None,
        typer.Option(help="Name clients use; repeat for aliases. Default: --model."),
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option(min=1)] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(min=1)] = 1,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto | bfloat16 | float16 | float32. auto: bfloat16 on GPUs of compute capability 8+,"
            " float16 on older GPUs; on the CPU float32 unless it has bfloat16 instructions."
        ),
    ] = "auto",
    max_model_len: Annotated[int | None, typer.Option(min=1)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(min=0.01, max=1.0)] = None,
    chat_template: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    runner: Annotated[str, typer.Option(help="generate | pooling (embeddings).")] = "generate",
    engine_arg: Annotated[
        list[str] | None, typer.Option(help="Any other vLLM engine flag as KEY=VALUE. Repeatable.")
    ] = None,
    distributed_executor_backend: Annotated[
        str | None,
        typer.Option(
            help="mp | ray | uni. ray: vLLM's Ray executor spreads TP x PP over a Ray cluster's GPUs"
            " (several nodes too). Default: vLLM's choice (processes on this node)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="The Ray cluster to join (sets RAY_ADDRESS), e.g. 10.0.0.5:6379; needs the ray backend."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the worker binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Worker port; 0 picks a free one.")] = 0,
    advertise_url: Annotated[str | None, typer.Option(help="URL gateways use to reach this worker.")] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            envvar="VPOOL_WORKER_ID",
            help="Stable id in the registry (default: NAME-random). Jobs set it from their job id.",
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where builtin models are generated.")] = None,
    drain_delay: Annotated[
        float, typer.Option(help="On SIGTERM, seconds between leaving routing and refusing connections.")
    ] = 2.0,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, the longest wait for in-flight requests to finish.")
    ] = 300.0,
) -> None:
    """Start one vLLM engine and register it with a controller (VPOOL_REGISTRATION_TOKEN)."""
    import os

    from pydantic import ValidationError

    from vpool.config import default_cache_dir
    from vpool.worker.server import WorkerOptions, run_worker

    names = served_name or [model]
    try:
        engine_args = parse_engine_args(engine_arg or [])
        backend = distributed_executor_backend or engine_args.pop("distributed_executor_backend", None)
        if ray_address and backend != "ray":
            raise ValueError("--ray-address joins a Ray cluster: give --distributed-executor-backend ray too")
        spec = ModelSpec(
            name=names[0],
            aliases=names[1:],
            model=model,
            runner=runner,  # type: ignore[arg-type]
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            chat_template=chat_template,
            engine_args=engine_args,
            distributed_executor_backend=backend,
        )
    except (ValidationError, ValueError) as exc:
        typer.secho(f"invalid worker options: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address  # vLLM's Ray executor calls ray.init(address=None)
    start_logging()
    options = WorkerOptions(
        spec=spec,
        controller_url=controller,
        registration_token=os.environ.get("VPOOL_REGISTRATION_TOKEN"),
        host=host,
        port=port,
        advertise_url=advertise_url,
        worker_id=worker_id,
        cache_dir=cache_dir or default_cache_dir(),
        drain_delay_s=drain_delay,
        drain_timeout_s=drain_timeout,
    )
    raise typer.Exit(asyncio.run(run_worker(options)))
