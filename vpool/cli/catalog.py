"""`vpool list` (the model catalog) and `vpool plan` (will a model fit on a GPU, and how).

Both read the catalog here, with no controller: the built-in one, VPOOL_CATALOG's files, then
each `--catalog FILE`. Errors are one sentence on stderr and exit status 2 (`{"error": {...}}`
on stdout under `--json`); `vpool plan` exits 0 when the model fits and 1 when it does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vpool.catalog.catalog import Catalog, CatalogEntry, load_catalog
from vpool.catalog.errors import CatalogError
from vpool.catalog.planner import DEFAULT_GPU, Plan, plan
from vpool.cli.common import app, fail, print_json

CatalogOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--catalog",
        help="A catalog file merged over the built-in one (after VPOOL_CATALOG's). Repeatable.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


@app.command("list")
def list_models(
    model: Annotated[str | None, typer.Argument(help="Show this model's whole entry.")] = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The model catalog: every model, or one model's whole entry."""
    try:
        models = load_catalog(catalog or [])
        entry = models.get(model) if model else None
    except CatalogError as exc:
        fail(exc, as_json)
    if entry is not None:
        if as_json:
            print_json(entry.model_dump(mode="json"))
        else:
            _console().print(_entry_table(entry))
        return
    if as_json:
        print_json({"models": [e.model_dump(mode="json") for e in models], "sources": models.sources})
    else:
        _console().print(_catalog_table(models))


@app.command("plan")
def plan_model(
    model: Annotated[str, typer.Argument(help="A catalog name, or a local Hugging Face model directory.")],
    gpu: Annotated[str, typer.Option(help="GPU type (H100-80GB, a100, MI300X, ...).")] = DEFAULT_GPU,
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Context to plan for (default: the catalog's).")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Sequences of max_model_len the KV cache holds at once.")
    ] = 1,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32.")] = "auto",
    quantization: Annotated[
        str | None, typer.Option(help="none | fp8 | gptq | awq (default: the checkpoint's own).")
    ] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(help="auto | fp8 (half the KV cache).")] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(min=0.01, max=1.0, help="vLLM's memory fraction (default 0.9).")
    ] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(min=1, help="Plan this TP size only.")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(min=1, help="Plan this PP size only.")] = None,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="The largest TP size searched.")] = 8,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Will MODEL fit on a GPU type, and at what tensor/pipeline-parallel size?

    Per GPU: weights, KV cache and vLLM's overhead, and the longest context that fits.
    Exit status 0 when it fits, 1 when it does not, 2 on an error."""
    try:
        target: CatalogEntry | Path = (
            Path(model).expanduser() if _is_path(model) else load_catalog(catalog or []).get(model)
        )
        verdict = plan(
            target,
            gpu=gpu,
            max_model_len=max_model_len,
            concurrency=concurrency,
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            gpus_per_node=gpus_per_node,
        )
    except CatalogError as exc:
        fail(exc, as_json)
    if as_json:
        print_json({**verdict.model_dump(mode="json"), "summary": verdict.summary()})
    else:
        console = _console()
        console.print(_plan_table(verdict))
        console.print(verdict.summary(), style="green" if verdict.fits else "red", soft_wrap=True)
        for note in verdict.notes:
            console.print(f"note: {note}", style="dim", soft_wrap=True)
    raise typer.Exit(0 if verdict.fits else 1)


def _is_path(model: str) -> bool:
    """A directory, or what can only be meant as one (hub ids hold a slash too)."""
    return model.startswith(("/", ".", "~")) or Path(model).expanduser().is_dir()


def _console() -> Console:
    console = Console()
    # Piped output keeps whole rows rather than wrapping them into 80 columns.
    return console if console.is_terminal else Console(width=160)


def _gpus_label(entry: CatalogEntry) -> str:
    slurm = entry.slurm
    if slurm.gpus_per_node == 0:
        return "CPU"
    label = str(slurm.gpus_per_node)
    return label if slurm.num_nodes == 1 else f"{label} x {slurm.num_nodes} nodes"


def _catalog_table(models: Catalog) -> Table:
    table = Table(title="Model catalog", caption="merged: " + ", ".join(models.sources), title_justify="left")
    for column, justify in (("Name", "left"), ("Type", "left"), ("Family", "left"),
                            ("Params", "right"), ("Max len", "right"), ("GPUs", "right")):  # fmt: skip
        table.add_column(column, justify=justify, no_wrap=column == "Name")  # type: ignore[arg-type]
    for entry in models:
        table.add_row(
            entry.name,
            entry.type,
            entry.family,
            entry.parameters_label(),
            f"{entry.max_model_len:,}",
            _gpus_label(entry),
        )
    return table


def _entry_table(entry: CatalogEntry) -> Table:
    table = Table(title=entry.name, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    data = entry.model_dump(mode="json")
    data["runner"] = entry.runner
    for key, value in _flatten(data):
        table.add_row(key, value)
    return table


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "engine_args":
            rows += _flatten(value, f"{name}.")
        elif value is not None:
            rows.append((name, json.dumps(value) if isinstance(value, dict | list) else str(value)))
    return rows


def _plan_table(p: Plan) -> Table:
    table = Table(title=f"{p.model} on {p.gpu}", show_header=False, title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    precision = p.dtype + (f", {p.quantization}" if p.quantization else "")
    layout = f"TP {p.tensor_parallel_size} x PP {p.pipeline_parallel_size} = {p.num_gpus} GPU(s)"
    if p.num_nodes > 1:
        layout += f" on {p.num_nodes} nodes"
    rows = [
        ("GPU memory", f"{p.gpu_memory_gib:g} GiB x {p.gpu_memory_utilization:g} = {p.budget_gib:.1f} GiB"),
        ("precision", f"{precision}; KV cache {p.kv_cache_dtype}"),
        ("context", f"{p.max_model_len:,} tokens x {p.concurrency} sequence(s)"),
        ("layout", layout),
        ("weights", f"{p.weights_gib:.2f} GiB"),
        ("KV cache", f"{p.kv_cache_gib:.2f} GiB"),
        ("overhead", f"{p.overhead_gib:.2f} GiB"),
        ("total per GPU", f"{p.total_gib:.2f} GiB"),
        ("longest max_model_len", f"{p.max_model_len_that_fits:,} at {p.concurrency} sequence(s)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
