"""The `vpool` command. Each module registers its commands on the one typer app."""

from __future__ import annotations

from vpool.cli import catalog as _catalog  # noqa: F401  (registers list, plan)
from vpool.cli import deploy as _deploy  # noqa: F401  (registers deploy kubernetes)
from vpool.cli import jobs as _jobs  # noqa: F401  (registers launch, status, jobs, metrics, ...)
from vpool.cli import keys as _keys  # noqa: F401  (registers keys create, list, show, update, revoke)
from vpool.cli import serve as _serve  # noqa: F401  (registers up, gateway, controller, worker)
from vpool.cli import usage as _usage  # noqa: F401  (registers usage)
from vpool.cli.common import app


def main() -> None:
    app()
