"""The GPU table (`gpus.yaml`): memory, compute capability, bfloat16 and fp8 support, and what
`--dtype auto` runs on each."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vpool.catalog.errors import UnknownGPU

GiB = 1024**3


class GPU(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    vendor: Literal["nvidia", "amd"]
    memory_gib: float = Field(gt=0)  # as marketed: 80 for an 80 GB H100
    # The device's total as the driver reports it (what vLLM multiplies by the memory
    # utilization), where a published log shows it.
    reported_gib: float | None = Field(None, gt=0)
    compute_capability: str | None = None  # NVIDIA only, "8.0"
    gfx: str | None = None  # AMD only, "gfx942"
    bf16: bool
    fp8: bool
    aliases: list[str] = Field(default_factory=list)

    @property
    def usable_gib(self) -> float:
        """What the planner takes as the device's memory."""
        return self.reported_gib or self.memory_gib


class GPUTable:
    """The known GPUs; `get` accepts any case and the short aliases (h100, a100)."""

    def __init__(self, gpus: list[GPU]) -> None:
        self._gpus = {gpu.name: gpu for gpu in gpus}
        self._keys: dict[str, GPU] = {}
        for gpu in gpus:
            for key in (gpu.name, *gpu.aliases):
                self._keys[_key(key)] = gpu

    def __iter__(self) -> Iterator[GPU]:
        return iter(self._gpus.values())

    def names(self) -> list[str]:
        return list(self._gpus)

    def get(self, name: str) -> GPU:
        gpu = self._keys.get(_key(name))
        if gpu is None:
            raise UnknownGPU(
                f'Unknown GPU type "{name}". Known: {", ".join(self._gpus)}.',
                param="gpu",
                choices=self.names(),
            )
        return gpu


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def load_gpus() -> GPUTable:
    data = yaml.safe_load(resources.files("vpool.catalog").joinpath("gpus.yaml").read_text())
    return GPUTable([GPU(name=name, **fields) for name, fields in data["gpus"].items()])


def auto_dtype(gpu: GPU, native_dtype: str) -> str:
    """What `--dtype auto` runs on `gpu`: bfloat16 where the GPU has it (NVIDIA compute
    capability 8 and up, AMD MI200 and up), else float16. A float16 checkpoint stays float16
    (as in vLLM: nothing is gained by converting it) and a float32 one is halved to 16 bits."""
    if native_dtype == "float16":
        return "float16"
    return "bfloat16" if gpu.bf16 else "float16"
