"""Schemathesis against the gateway's own `/openapi.json`, over a stub worker.

Every operation the schema describes (the data routes included) is called with bodies
generated from it, half of them naming the model the stub serves so that they reach a
worker: no answer may be a 5xx, and every error must be in the OpenAI shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support.stub_worker import StubWorker
from tests.unit.conftest import GatewayHandle, Servers

SERVED = "fuzz-model"


@pytest.fixture(scope="module")
def fuzzed_gateway(module_servers: Servers) -> Iterator[GatewayHandle]:
    stub = module_servers.stub(StubWorker("fuzzed"))
    gateway = module_servers.gateway()
    gateway.add_worker(stub, [SERVED])
    yield gateway


@pytest.fixture(scope="module")
def api_schema(fuzzed_gateway: GatewayHandle) -> Any:
    return schemathesis.openapi.from_url(fuzzed_gateway.url + "/openapi.json")


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer of 400 or more is `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return True


# Driven by hand rather than by schemathesis' pytest plugin, which does not run on pytest 9.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_5xx_and_every_error_is_in_the_openai_shape(
    api_schema: Any, mode: GenerationMode
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20  # the data routes are in the schema, not only FastAPI's own
    called: dict[str, set[int]] = {}
    for operation in operations:
        try:
            _fuzz(operation, mode, called.setdefault(operation.label, set()))
        except Unsatisfiable:
            # Nothing of it can be made invalid: no body, a free string at most (`GET /health`).
            assert mode == GenerationMode.NEGATIVE, operation.label
            assert "requestBody" not in operation.definition.raw, operation.label
    if mode == GenerationMode.POSITIVE:  # valid bodies naming the served model reach the worker
        assert 200 in called["POST /v1/chat/completions"] and 200 in called["POST /tokenize"], called


def _fuzz(operation: Any, mode: GenerationMode, statuses: set[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case: Any) -> None:
        if isinstance(case.body, dict) and "model" in case.body and hash(repr(case.body)) % 2:
            case.body["model"] = SERVED
        response = case.call()
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, openai_error_shape])

    call()
