"""The gateway and controller must install and start without vLLM, torch or Ray."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_controller_and_cli_import_without_vllm_or_torch() -> None:
    code = (
        "import sys\n"
        "import vpool.cli, vpool.embedded, vpool.gateway.app\n"
        "import vpool.controller.app, vpool.controller.service\n"
        "heavy = {'vllm', 'torch', 'transformers', 'ray'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
