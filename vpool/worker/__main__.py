"""`python -m vpool.worker --spec-json ...`: how the launcher starts a worker process.

People use `vpool worker` instead; both end in `run_worker`. The `__main__` guard matters:
vLLM spawns its engine-core process, which re-imports the main module.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from vpool.config import ModelSpec
from vpool.logs import setup_logging


def main() -> None:
    from vpool.worker.server import WorkerOptions, run_worker

    parser = argparse.ArgumentParser(prog="python -m vpool.worker")
    parser.add_argument("--spec-json", required=True)
    parser.add_argument("--controller", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args()
    setup_logging()
    options = WorkerOptions(
        spec=ModelSpec.model_validate_json(args.spec_json),
        controller_url=args.controller,
        registration_token=os.environ.get("VPOOL_REGISTRATION_TOKEN"),
        host=args.host,
        port=args.port,
        worker_id=args.worker_id,
        cache_dir=args.cache_dir,
        exit_with_parent=True,
    )
    raise SystemExit(asyncio.run(run_worker(options)))


if __name__ == "__main__":
    main()
