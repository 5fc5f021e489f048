"""What a launch asks the controller for: a catalog model and what to change of its defaults.

The bodies of `POST /admin/v1/jobs` and `/admin/v1/jobs/batch`, shared by the controller
(which resolves them against its catalog) and `vpool.client` (which sends them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LauncherName = Literal["local", "slurm"]


class LaunchOverrides(BaseModel):
    """Everything a launch may change of the catalog entry; None keeps the catalog's value."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1, le=64)
    max_model_len: int | None = Field(None, gt=0)
    tensor_parallel_size: int | None = Field(None, ge=1)
    pipeline_parallel_size: int | None = Field(None, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # `--vllm-args '--a=1,--b=2'` as vec-inf takes them: vLLM flags, comma-separated.
    vllm_args: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str | None = None
    num_nodes: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    account: str | None = None
    weights_dir: str | None = None
    gpu: str | None = None  # the GPU type to plan for (catalog GPU table)


class LaunchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    launcher: LauncherName = "local"
    overrides: LaunchOverrides = Field(default_factory=LaunchOverrides)
    force: bool = False  # launch even when the planner says it cannot fit


class BatchLaunchRequest(BaseModel):
    """Several models in one Slurm heterogeneous job: nothing starts until all are allocated."""

    model_config = ConfigDict(extra="forbid")

    models: list[LaunchRequest] = Field(min_length=1, max_length=16)
