"""`vpool launch`, `batch-launch`, `status`, `jobs`, `metrics`, `shutdown`, `logs`: jobs on a
cluster, through the controller (`--controller URL` or VPOOL_CONTROLLER_URL, the admin token
from VPOOL_ADMIN_TOKEN). Built on `vpool.client`.

Errors are one sentence on stderr and exit status 2 (`{"error": {...}}` on stdout under
`--json`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from vpool.cli.common import ControllerOpt, JsonOpt, app, fail, invalid, parse_engine_args, print_json
from vpool.client import VpoolClient, VpoolClientError, launch_request
from vpool.registry.records import JobRecord

JobArg = Annotated[str, typer.Argument(help="The job id `vpool launch` printed.")]


def _job_table(job: JobRecord) -> Table:
    """A job's launch config, as vec-inf prints it, with its id and state."""
    table = Table(show_header=False, title=f"Job {job.job_id}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("Job ID", job.job_id)
    table.add_row("State", job.state.value + (f" ({job.reason})" if job.reason else ""))
    for key, value in job.config.items():
        if key == "plan" and isinstance(value, dict):
            value = f"{value.get('total_gib', 0):.1f} GiB per GPU of {value.get('gpu_memory_gib', 0):.1f}"
        label = key.replace("_", " ").capitalize()
        table.add_row(label, json.dumps(value) if isinstance(value, dict | list) else str(value))
    table.add_row("Log directory", job.log_dir)
    if job.worker_urls:
        table.add_row("Worker", ", ".join(job.worker_urls))
    return table


@app.command()
def launch(
    model: Annotated[str, typer.Argument(help="A catalog model (see `vpool list`).")],
    launcher: Annotated[str, typer.Option(help="local | slurm | ray | skypilot")] = "local",
    replicas: Annotated[int | None, typer.Option(min=1, help="Workers (one job each).")] = None,
    max_model_len: Annotated[int | None, typer.Option(min=1)] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(min=1)] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(min=1)] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | bfloat16 | float16 | float32")] = None,
    engine_arg: Annotated[
        list[str] | None, typer.Option(help="A vLLM engine flag as KEY=VALUE. Repeatable.")
    ] = None,
    vllm_args: Annotated[str | None, typer.Option(help="vLLM flags, vec-inf style: '--a=1,--b=2'.")] = None,
    partition: Annotated[str | None, typer.Option()] = None,
    qos: Annotated[str | None, typer.Option()] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="Slurm time limit, e.g. 08:00:00.")] = None,
    num_nodes: Annotated[int | None, typer.Option(min=1)] = None,
    gpus_per_node: Annotated[int | None, typer.Option(min=0)] = None,
    cpus_per_task: Annotated[int | None, typer.Option(min=1)] = None,
    mem: Annotated[str | None, typer.Option(help="Memory per node, e.g. 64G.")] = None,
    account: Annotated[str | None, typer.Option()] = None,
    weights_dir: Annotated[
        str | None, typer.Option(help="Parent of FAMILY-VARIANT weight directories.")
    ] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU type: the planner refuses what cannot fit.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="--launcher ray: the cluster's dashboard, e.g. http://ray-head:8265.")
    ] = None,
    accelerator: Annotated[
        str | None, typer.Option(help="--launcher skypilot: the VM's GPUs as NAME:COUNT, e.g. A100:1.")
    ] = None,
    cloud: Annotated[str | None, typer.Option(help="--launcher skypilot: aws, gcp, azure, ...")] = None,
    region: Annotated[str | None, typer.Option(help="--launcher skypilot: the cloud's region.")] = None,
    cluster: Annotated[
        str | None, typer.Option(help="--launcher skypilot: the cluster's name (default: vpool-MODEL-ID).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option(help="--launcher skypilot: KEY=VALUE for the worker. Repeatable.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="--launcher skypilot: the weights' bucket, e.g. s3://bucket/path.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Launch even when the planner says it cannot fit.")] = False,
    controller: ControllerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Launch a catalog model; its worker registers itself and the gateway serves it by name."""
    try:
        overrides: dict[str, Any] = {
            "replicas": replicas, "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size, "dtype": dtype, "vllm_args": vllm_args,
            "engine_args": parse_engine_args(engine_arg or []), "partition": partition, "qos": qos,
            "time": time_limit, "num_nodes": num_nodes, "gpus_per_node": gpus_per_node,
            "cpus_per_task": cpus_per_task, "mem": mem, "account": account, "weights_dir": weights_dir,
            "gpu": gpu, "ray_address": ray_address, "accelerator": accelerator, "cloud": cloud,
            "region": region, "cluster": cluster, "envs": _parse_envs(env or []) or None, "source": source,
        }  # fmt: skip
        request = launch_request(
            model, launcher, force, **{k: v for k, v in overrides.items() if v is not None}
        )
    except ValidationError as exc:
        invalid(f"invalid launch options: {_first_error(exc)}", as_json)
    except (ValueError, TypeError) as exc:
        invalid(f"invalid launch options: {exc}", as_json)
    try:
        with VpoolClient(controller) as fleet:
            jobs = fleet.submit(request)
    except VpoolClientError as exc:
        fail(exc, as_json)
    _show_jobs(jobs, as_json)


def _parse_envs(pairs: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` pairs, the value as written."""
    envs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got `{pair}`")
        envs[key] = value
    return envs


def _first_error(exc: ValidationError) -> str:
    """Pydantic's first complaint on one line: `overrides.source: the weights' source ...`."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _show_jobs(jobs: list[JobRecord], as_json: bool) -> None:
    if as_json:
        print_json(
            [j.model_dump(mode="json") for j in jobs] if len(jobs) > 1 else jobs[0].model_dump(mode="json")
        )
        return
    console = Console(highlight=False)
    for job in jobs:
        console.print(_job_table(job))
    console.print(f"Follow it with: vpool status {jobs[0].job_id}")


@app.command("batch-launch")
def batch_launch(
    models: Annotated[list[str] | None, typer.Argument(help="Catalog models, one component each.")] = None,
    batch_config: Annotated[
        Path | None,
        typer.Option(help="YAML: a list of {model: NAME, <launch options>} (engine_args, partition, ...)."),
    ] = None,
    controller: ControllerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Several models in one Slurm heterogeneous job: none starts until all are allocated.
    Their jobs are JOB+0, JOB+1, ..."""
    try:
        items: list[dict[str, Any]] = [{"model": m} for m in models or []]
        if batch_config is not None:
            loaded = yaml.safe_load(batch_config.read_text())
            if not isinstance(loaded, list):
                raise ValueError(f"{batch_config} must hold a list of models")
            items += loaded
        if not items:
            raise ValueError("name at least one model, or give --batch-config")
        requests = [
            launch_request(str(item.pop("model")), "slurm", bool(item.pop("force", False)), **item)
            for item in items
        ]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as exc:
        invalid(f"invalid batch: {exc}", as_json)
    try:
        with VpoolClient(controller) as fleet:
            jobs = fleet.batch_launch(requests)
    except VpoolClientError as exc:
        fail(exc, as_json)
    _show_jobs(jobs, as_json)


def _status_line(job: JobRecord, gateway_url: str | None) -> str:
    line = f"{job.job_id}  {job.model}  {job.state.value}"
    if job.reason:
        line += f"  ({job.reason})"
    if job.state.value == "READY":
        line += f"\n  served as `{job.model}` by the gateway{f' at {gateway_url}' if gateway_url else ''}"
        line += f"\n  worker: {', '.join(job.worker_urls)}"
    return line


@app.command()
def status(
    job_id: JobArg,
    controller: ControllerOpt = None,
    gateway: Annotated[
        str | None, typer.Option(envvar="VPOOL_GATEWAY_URL", help="Gateway base URL to show.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A job's state: PENDING (with Slurm's reason), LAUNCHING, READY, FAILED (why), SHUTDOWN."""
    try:
        with VpoolClient(controller) as fleet:
            job = fleet.status(job_id)
    except VpoolClientError as exc:
        fail(exc, as_json)
    if as_json:
        print_json({**job.model_dump(mode="json"), "gateway_url": gateway})
    else:
        typer.echo(_status_line(job, gateway))


@app.command()
def jobs(controller: ControllerOpt = None, as_json: JsonOpt = False) -> None:
    """Every job the controller launched, and its state."""
    try:
        with VpoolClient(controller) as fleet:
            found = fleet.jobs()
    except VpoolClientError as exc:
        fail(exc, as_json)
    if as_json:
        print_json([j.model_dump(mode="json") for j in found])
        return
    table = Table(title="Jobs", title_justify="left")
    for column in ("job", "model", "launcher", "state", "reason", "age"):
        table.add_column(column)
    for job in found:
        table.add_row(
            job.job_id, job.model, job.launcher, job.state.value, job.reason or "",
            f"{time.time() - job.submitted_at:.0f}s",
        )  # fmt: skip
    Console().print(table if found else "No jobs launched.")


@app.command()
def shutdown(job_id: JobArg, controller: ControllerOpt = None, as_json: JsonOpt = False) -> None:
    """Stop a job: its worker leaves routing, finishes what it serves, then exits."""
    try:
        with VpoolClient(controller) as fleet:
            job = fleet.shutdown(job_id)
    except VpoolClientError as exc:
        fail(exc, as_json)
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        typer.echo(
            f"{job.job_id}: shutting down (the worker drains, then leaves); see `vpool status {job.job_id}`"
        )


@app.command()
def logs(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as the log grows.")] = False,
    tail: Annotated[int, typer.Option(help="Start this many bytes from the end (0: the whole log).")] = 8192,
    controller: ControllerOpt = None,
) -> None:
    """The job's worker log."""
    try:
        with VpoolClient(controller) as fleet:
            offset = -tail if tail else 0
            while True:
                text, offset = fleet.log(job_id, offset)
                typer.echo(text, nl=False)
                if not follow:
                    return
                if not text:
                    time.sleep(1.0)
    except VpoolClientError as exc:
        fail(exc, False)
    except KeyboardInterrupt:
        return


METRIC_COLUMNS = (
    ("prompt tok/s", "prompt_throughput"),
    ("generation tok/s", "generation_throughput"),
    ("running", "requests_running"),
    ("waiting", "requests_waiting"),
    ("KV cache", "kv_cache_usage"),
    ("avg latency s", "average_latency_s"),
    ("prompt tokens", "prompt_tokens_total"),
    ("generated tokens", "generation_tokens_total"),
    ("successful", "successful_requests_total"),
)


def derive_metrics(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """One worker's figures, with throughput from the change since `before` (None: 0)."""
    out = dict(now)
    count = now.get("request_latency_count") or 0
    out["average_latency_s"] = (now.get("request_latency_sum_s") or 0) / count if count else None
    elapsed = (now["at"] - before["at"]) if before else 0
    for rate, total in (
        ("prompt_throughput", "prompt_tokens_total"),
        ("generation_throughput", "generation_tokens_total"),
    ):
        out[rate] = (now[total] - before[total]) / elapsed if before and elapsed > 0 else 0.0
    return out


def _metrics_table(job_id: str, rows: list[dict[str, Any]]) -> Table:
    """One line per figure, one column per worker (a job has one or a few)."""
    table = Table(title=f"Job {job_id}: vLLM metrics", title_justify="left")
    table.add_column("metric")
    for row in rows:
        table.add_column(row["worker_url"], justify="right")
    for label, key in METRIC_COLUMNS:
        table.add_row(label, *(_cell(key, row.get(key)) for row in rows))
    return table


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "kv_cache_usage":
        return f"{value:.1%}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{value:,.0f}"


@app.command()
def metrics(
    job_id: JobArg,
    once: Annotated[
        bool, typer.Option("--once", help="Print once (throughput over one second), then exit.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    controller: ControllerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A live table of the job's vLLM metrics: throughput, requests, KV cache, latency, totals."""
    try:
        with VpoolClient(controller) as fleet:
            previous = {w["worker_url"]: w for w in fleet.metrics(job_id)["workers"]}
            if once:
                time.sleep(1.0)
                rows = [
                    derive_metrics(previous.get(w["worker_url"]), w) for w in fleet.metrics(job_id)["workers"]
                ]
                if as_json:
                    print_json({"job_id": job_id, "workers": rows})
                else:
                    Console().print(_metrics_table(job_id, rows))
                return
            with Live(_metrics_table(job_id, []), refresh_per_second=1) as live:
                while True:
                    time.sleep(interval)
                    current = fleet.metrics(job_id)["workers"]
                    rows = [derive_metrics(previous.get(w["worker_url"]), w) for w in current]
                    previous = {w["worker_url"]: w for w in current}
                    live.update(_metrics_table(job_id, rows))
    except VpoolClientError as exc:
        fail(exc, as_json)
    except KeyboardInterrupt:
        return
