"""What can go wrong reading the catalog or planning a model, as one small tree.

    CatalogError            a catalog file is missing, not YAML, or an entry is invalid
     ├── UnknownModel       a name the catalog lacks (also a KeyError); lists close names
     ├── UnknownGPU         a GPU type the GPU table lacks (also a KeyError); lists known ones
     └── PlanError          the planner cannot answer: a bad model directory, a TP size the
                            model cannot split into, a length past the model's maximum

Each carries a `code` and the names a user may have meant, so the CLI renders the same error
as a sentence on stderr or as `{"error": {...}}` under `--json`.
"""

from __future__ import annotations

from typing import Any


class CatalogError(Exception):
    code = "invalid_catalog"

    def __init__(self, message: str, *, param: str | None = None, choices: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.choices = choices or []

    def __str__(self) -> str:
        # KeyError would print the repr of its argument, quotes and all.
        return self.message

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "code": self.code, "param": self.param}
        if self.choices:
            error["choices"] = self.choices
        return {"error": error}


class UnknownModel(CatalogError, KeyError):
    code = "unknown_model"


class UnknownGPU(CatalogError, KeyError):
    code = "unknown_gpu"


class PlanError(CatalogError):
    code = "cannot_plan"
