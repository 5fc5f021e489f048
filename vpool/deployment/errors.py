"""The one error of `vpool deploy`, below every module that raises it."""

from __future__ import annotations

from typing import Any


class DeployError(Exception):
    """What `vpool deploy kubernetes` refuses: a model that does not fit, a name it cannot
    use, an output directory it may not fill. Rendered by the CLI as `fail` does."""

    def __init__(self, message: str, *, code: str = "invalid_deployment", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "code": self.code, "param": self.param}}
