"""What `vpool up` shows a person: loading progress, then how to call the fleet."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vpool.config import Settings
from vpool.controller.launcher import LaunchedWorker
from vpool.registry.records import WorkerState

STATE_STYLE = {
    WorkerState.LAUNCHING: "yellow",
    WorkerState.READY: "green",
    WorkerState.FAILED: "red",
}


def progress_table(workers: list[LaunchedWorker]) -> Table:
    table = Table(title="Loading models", title_justify="left", expand=True)
    table.add_column("worker", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("latest log line", overflow="ellipsis", no_wrap=True, ratio=1)
    for w in workers:
        elapsed = f"{time.monotonic() - w.started_at:.0f}s"
        state = Text(w.state.value, style=STATE_STYLE.get(w.state, ""))
        table.add_row(w.worker_id, w.spec.name, state, elapsed, w.last_log_line()[-160:])
    return table


def base_url(settings: Settings) -> str:
    host = settings.gateway.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{settings.gateway.port}/v1"


def ready_panel(settings: Settings, models: list[tuple[str, str, int]]) -> Panel:
    """`models`: (name, runner, ready replicas)."""
    url = base_url(settings)
    key = settings.gateway.api_keys[0] if settings.gateway.api_keys else "none"
    table = Table(show_header=True, expand=False)
    table.add_column("model")
    table.add_column("kind")
    table.add_column("replicas", justify="right")
    table.add_column("endpoint")
    for name, runner, replicas in models:
        endpoint = "/v1/embeddings" if runner == "pooling" else "/v1/chat/completions, /v1/completions"
        table.add_row(name, "embeddings" if runner == "pooling" else "chat", str(replicas), endpoint)
    chat = next((n for n, r, _ in models if r != "pooling"), None)
    auth = f' -H "Authorization: Bearer {key}"' if settings.gateway.api_keys else ""
    lines = [Text(f"base URL  {url}", style="bold")]
    lines.append(Text(f"admin     http://{settings.controller.host}:{settings.controller.port}/v1/workers"))
    if not settings.gateway.api_keys:
        lines.append(Text("auth      none (open, loopback only)", style="yellow"))
    if chat:
        lines.append(Text(""))
        lines.append(
            Text(
                f"curl {url}/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
                f'  -d \'{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
            )
        )
        lines.append(
            Text(
                f"python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}', api_key='{key}'); "
                f"print(c.chat.completions.create(model='{chat}', "
                f"messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)\""
            )
        )
    embed = next((n for n, r, _ in models if r == "pooling"), None)
    if embed:
        lines.append(
            Text(
                f"curl {url}/embeddings -H 'Content-Type: application/json'{auth} \\\n"
                f'  -d \'{{"model": "{embed}", "input": "Hello"}}\''
            )
        )
    return Panel(Group(table, *lines), title="vpool is ready", border_style="green")


def make_console() -> Console:
    return Console(highlight=False)
