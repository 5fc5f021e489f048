"""Loading the configuration: YAML, then `VPOOL_*` environment variables, then CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vpool.config import ConfigError, load_settings

DOCS_EXAMPLE = """\
gateway: {host: 127.0.0.1, port: 8000, api_keys: [sk-...]}
registry: {url: memory://}          # or redis://host:6379/0
controller: {port: 8001, heartbeat_interval_s: 1.0, expiry_intervals: 3}
models:                             # engines vpool starts and supervises
  - name: tiny-chat
    model: builtin:tiny-chat        # or a local path, or a hub id
    aliases: [chat]
    tensor_parallel_size: 1
    replicas: 2
    engine_args: {max_model_len: 2048, enforce_eager: true}
  - name: all-MiniLM-L6-v2
    model: builtin:all-MiniLM-L6-v2
    runner: pooling
endpoints:                          # OpenAI-compatible servers already running elsewhere
  - url: http://10.0.0.5:8000
    models: [llama-3-8b]
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VPOOL_* variable from the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("VPOOL_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vpool.yaml"
    path.write_text(text)
    return path


def test_example_config_from_the_docs_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, DOCS_EXAMPLE))
    assert (settings.gateway.host, settings.gateway.port) == ("127.0.0.1", 8000)
    assert settings.gateway.api_keys == ["sk-..."]
    assert settings.registry.url == "memory://"
    assert settings.controller.port == 8001
    assert settings.controller.worker_ttl_s == 3.0
    chat, minilm = settings.models
    assert chat.served_names == ["tiny-chat", "chat"]
    assert chat.replicas == 2
    assert chat.engine_args == {"max_model_len": 2048, "enforce_eager": True}
    assert minilm.runner == "pooling"
    assert settings.endpoints[0].url == "http://10.0.0.5:8000"
    assert settings.catalog_names() == {"tiny-chat", "chat", "all-MiniLM-L6-v2", "llama-3-8b"}


def test_no_file_gives_defaults_that_work_on_a_laptop() -> None:
    settings = load_settings()
    assert settings.gateway.host == "127.0.0.1"
    assert settings.gateway.is_open
    assert settings.registry.url == "memory://"
    assert settings.models == []


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).gateway.port == 8000


def test_environment_variable_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPOOL_GATEWAY__PORT", "9100")
    settings = load_settings(write(tmp_path, DOCS_EXAMPLE))
    assert settings.gateway.port == 9100
    assert settings.gateway.api_keys == ["sk-..."]  # the rest of the section still from the file


def test_command_line_flag_beats_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPOOL_GATEWAY__PORT", "9100")
    monkeypatch.setenv("VPOOL_REGISTRY__URL", "redis://127.0.0.1:6379/0")
    settings = load_settings(write(tmp_path, DOCS_EXAMPLE), {"gateway": {"port": 9200}})
    assert settings.gateway.port == 9200
    assert settings.registry.url == "redis://127.0.0.1:6379/0"
    assert settings.gateway.api_keys == ["sk-..."]


def test_api_keys_shorthand_sets_the_gateway_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPOOL_API_KEYS", "a, b,,")
    assert load_settings().gateway.api_keys == ["a", "b"]
    assert load_settings(write(tmp_path, DOCS_EXAMPLE)).gateway.api_keys == ["a", "b"]


def test_registration_token_shorthand_sets_the_controller_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPOOL_REGISTRATION_TOKEN", "t0ken")
    assert load_settings().controller.registration_token == "t0ken"


def test_public_host_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides={"gateway": {"host": "0.0.0.0"}})
    message = str(caught.value)
    assert "gateway" in message
    assert "refusing to serve 0.0.0.0 with no API key" in message
    assert "--no-auth" in message


def test_public_host_is_served_with_keys_or_with_no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    open_on_purpose = load_settings(overrides={"gateway": {"host": "0.0.0.0", "no_auth": True}})
    assert open_on_purpose.gateway.is_open
    monkeypatch.setenv("VPOOL_API_KEYS", "sk-1")
    with_keys = load_settings(overrides={"gateway": {"host": "0.0.0.0"}})
    assert with_keys.gateway.api_keys == ["sk-1"]


@pytest.mark.parametrize(
    "models",
    [
        "[{name: a, model: x}, {name: a, model: y}]",
        "[{name: a, model: x, aliases: [b]}, {name: b, model: y}]",
    ],
    ids=["same-name", "alias-equals-a-name"],
)
def test_a_model_name_given_twice_is_refused(tmp_path: Path, models: str) -> None:
    with pytest.raises(ConfigError, match="appears twice in the catalog"):
        load_settings(write(tmp_path, f"models: {models}\n"))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_settings(missing)
    assert str(missing) in str(caught.value)


def test_invalid_yaml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_settings(write(tmp_path, "gateway: {port: 8000\n"))


def test_file_that_is_not_a_mapping_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping at its top level"):
        load_settings(write(tmp_path, "- gateway\n- models\n"))


def test_unknown_section_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gatway"):
        load_settings(write(tmp_path, "gatway: {port: 1}\n"))


def test_bad_value_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load_settings(write(tmp_path, "gateway: {port: 70000}\n"))
    monkeypatch.setenv("VPOOL_GATEWAY__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load_settings()


def test_unknown_registry_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"registry\.url"):
        load_settings(overrides={"registry": {"url": "mysql://db"}})
