"""What a launch asks the controller for: a catalog model and what to change of its defaults.

The bodies of `POST /admin/v1/jobs` and `/admin/v1/jobs/batch`, shared by the controller
(which resolves them against its catalog) and `vpool.client` (which sends them).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LauncherName = Literal["local", "slurm", "ray", "skypilot"]

# The object stores SkyPilot mounts from (Azure's is https://ACCOUNT.blob.core.windows.net/...).
OBJECT_STORE_URL = re.compile(
    r"^((s3|gs|r2|cos|oci)://[^/\s]+|https://[^/\s]+\.blob\.core\.windows\.net/[^/\s]+)"
)


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
    ray_address: str | None = None  # --launcher ray: the cluster's dashboard, http://HEAD:8265
    # SkyPilot: the cloud VM's accelerators (NAME:COUNT), where, the cluster's name, the
    # worker's environment, and the bucket its weights are mounted from.
    accelerator: str | None = None
    cloud: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]*$")
    region: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    cluster: str | None = Field(None, max_length=40, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    envs: dict[str, str] = Field(default_factory=dict)
    source: str | None = None

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*(:[1-9][0-9]*)?", value):
            raise ValueError(f"an accelerator is NAME[:COUNT], e.g. A100:1 or H100:8, not {value!r}")
        return value

    @field_validator("envs")
    @classmethod
    def _envs(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is not None and not OBJECT_STORE_URL.match(value):
            raise ValueError(
                f"the weights' source must be an object-store URL (s3://, gs://, r2://, cos://, oci://"
                f" or https://ACCOUNT.blob.core.windows.net/...), not {value!r}"
            )
        return value


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
