"""Gateways and stub workers on real sockets, each in a thread of its own.

A test starts stub workers with `start_stub`, a gateway with `start_gateway`, and puts
`WorkerRecord`s for the stubs into the gateway's `MemoryRegistry`. Registry calls run on the
gateway's own event loop (the registry is not thread-safe), and `add_worker` refreshes the
gateway's fleet view at once, so a test never waits for a worker it just added.

The plain `gateway` and `stub` fixtures are started once per module and reset before each
test (registry emptied, stub back to its defaults with nothing received): stopping a uvicorn
server costs about 0.2 s of its polling, which would otherwise dominate the suite's time.
Tests that need another configuration, or that stop a server, start their own.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.support.stub_worker import RunningServer, StubWorker, serve_in_thread
from tests.unit.controllers import ControllerFactory, ControllerHandle, start_on
from vpool.config import GatewaySettings, ModelSpec, RegistrySettings, Settings
from vpool.gateway.app import create_app
from vpool.gateway.routing import RoutingPolicy
from vpool.gateway.server import gateway_server
from vpool.gateway.state import GatewayState
from vpool.registry.keys import KeyStore
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import WorkerLoad, WorkerRecord, WorkerState

MODEL = "tiny-chat"
API_KEY = "sk-unit-test"
REFRESH_S = 0.05
RECORD_TTL_S = 300.0


@dataclass
class GatewayHandle:
    url: str
    app: FastAPI
    registry: MemoryRegistry
    server: RunningServer
    _ids: Iterator[int]

    @property
    def state(self) -> GatewayState:
        """What the running app's requests share (built in its lifespan)."""
        state: GatewayState = self.app.state.gateway
        return state

    def add_worker(
        self,
        target: StubWorker | str,
        models: Sequence[str] = (MODEL,),
        *,
        worker_id: str | None = None,
        state: WorkerState = WorkerState.READY,
        waiting: int = 0,
        running: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        prefix_cache_queries: int = 0,
        prefix_cache_hits: int = 0,
    ) -> WorkerRecord:
        """Register a stub (or any URL) and make the gateway see it now."""
        url = target if isinstance(target, str) else target.url
        if worker_id is None:
            name = target.name if isinstance(target, StubWorker) else "url"
            worker_id = f"{name}-{next(self._ids)}"
        record = WorkerRecord(
            worker_id=worker_id,
            url=url,
            models=list(models),
            state=state,
            load=WorkerLoad(
                waiting=waiting,
                running=running,
                prefix_cache_queries=prefix_cache_queries,
                prefix_cache_hits=prefix_cache_hits,
            ),
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
        )
        self.server.call(self.registry.put(record, RECORD_TTL_S))
        self.refresh()
        return record

    def set_state(self, worker_id: str, state: WorkerState) -> None:
        """Change a record in the registry only: the gateway finds out by itself."""
        self.server.call(self.registry.set_state(worker_id, state, RECORD_TTL_S))

    def remove(self, worker_id: str) -> None:
        """Remove a record from the registry only: the gateway finds out by itself."""
        self.server.call(self.registry.remove(worker_id))

    def refresh(self) -> None:
        self.server.call(self.state.fleet.refresh())

    def clear(self) -> None:
        """Empty the registry and the fleet view."""

        async def remove_all() -> None:
            for record in await self.registry.list_workers():
                await self.registry.remove(record.worker_id)

        self.server.call(remove_all())
        self.refresh()


GatewayFactory = Callable[..., GatewayHandle]
StubFactory = Callable[..., StubWorker]


class Servers:
    """Servers started for a test (or a module), all stopped at its end.

    All are asked to stop first and then waited for: uvicorn notices a stop request only on
    its next tick, and waiting for each in turn would add that up.
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._started: list[RunningServer] = []

    def serve(self, app: Any, **options: Any) -> RunningServer:
        server = self._stack.enter_context(serve_in_thread(app, **options))
        self._started.append(server)
        return server

    def stub(self, stub: StubWorker) -> StubWorker:
        self._stack.enter_context(stub.running())
        self._started.append(stub.server)
        return stub

    def gateway(
        self,
        *,
        api_keys: Sequence[str] = (),
        catalog: Sequence[str] = (),
        max_body_bytes: int = 64 * 1024,
        max_attempts: int = 2,
        read_timeout_s: float = 10.0,
        policy: RoutingPolicy | None = None,
        customize: Callable[[FastAPI], None] | None = None,
        key_store: KeyStore | None = None,
        registry: RegistrySettings | None = None,
        **gateway_settings: Any,
    ) -> GatewayHandle:
        """A gateway over a registry of its own; `gateway_settings` are more GatewaySettings.
        Its key store is `key_store`, else the test session's (empty) one.

        `customize(app)` runs before it serves, as a team extending the app would. `registry`
        names a Redis for what gateways share beyond the fleet (the keys' limits); the fleet
        stays in memory, fed by `add_worker`.
        """
        gateway_settings.setdefault("connect_timeout_s", 2.0)
        settings = Settings(
            gateway=GatewaySettings(
                api_keys=list(api_keys),
                refresh_interval_s=REFRESH_S,
                max_body_bytes=max_body_bytes,
                max_attempts=max_attempts,
                read_timeout_s=read_timeout_s,
                **gateway_settings,
            ),
            models=[ModelSpec(name=name, model=f"builtin:{name}") for name in catalog],
            registry=registry or RegistrySettings(),
        )
        fleet_registry = MemoryRegistry()
        app = create_app(settings, fleet_registry, policy, key_store)
        if customize is not None:
            customize(app)
        server = self.serve(
            app, server_factory=lambda app, host, port: gateway_server(app, settings.gateway, host, port)
        )
        return GatewayHandle(server.url, app, fleet_registry, server, itertools.count(1))

    def request_stop(self) -> None:
        for server in self._started:
            server.request_stop()


@contextlib.contextmanager
def server_group() -> Iterator[Servers]:
    with contextlib.ExitStack() as stack:
        group = Servers(stack)
        try:
            yield group
        finally:
            group.request_stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    with server_group() as group:
        yield group


@pytest.fixture(scope="module")
def module_servers() -> Iterator[Servers]:
    with server_group() as group:
        yield group


@pytest.fixture
def start_stub(servers: Servers) -> StubFactory:
    def start(name: str = "stub", **options: Any) -> StubWorker:
        return servers.stub(StubWorker(name, **options))

    return start


@pytest.fixture
def start_gateway(servers: Servers) -> GatewayFactory:
    return servers.gateway


@pytest.fixture(scope="module")
def shared_stub(module_servers: Servers) -> StubWorker:
    return module_servers.stub(StubWorker("stub"))


@pytest.fixture(scope="module")
def shared_gateway(module_servers: Servers) -> GatewayHandle:
    return module_servers.gateway()


@pytest.fixture
def stub(shared_stub: StubWorker) -> StubWorker:
    """A running stub worker with default behaviour that has received nothing yet."""
    shared_stub.reset()
    return shared_stub


@pytest.fixture
def gateway(shared_gateway: GatewayHandle, stub: StubWorker) -> GatewayHandle:
    """An open gateway whose registry holds exactly one READY worker: `stub`, serving MODEL."""
    shared_gateway.clear()
    shared_gateway.add_worker(stub)
    return shared_gateway


@pytest.fixture
def start_controller(servers: Servers) -> Iterator[ControllerFactory]:
    started: list[ControllerHandle] = []

    def start(**options: Any) -> ControllerHandle:
        started.append(start_on(servers, **options))
        return started[-1]

    yield start
    for ctl in started:  # on the loop the registry's connections belong to
        ctl.server.call(ctl.registry.close())


@pytest.fixture(scope="module")
def shared_controller(module_servers: Servers) -> ControllerHandle:
    return start_on(module_servers)


@pytest.fixture
def controller(shared_controller: ControllerHandle) -> ControllerHandle:
    """A controller with no token over an empty registry: no workers, no gateways."""
    shared_controller.clear()
    return shared_controller


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The response is `status` with exactly the OpenAI error body; returns the error."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error
