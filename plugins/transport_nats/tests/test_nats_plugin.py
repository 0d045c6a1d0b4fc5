"""The plugin as lmcache sees it: discovery through the entry point and the nats_* settings."""

from __future__ import annotations

import pytest

from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.plugins import describe_plugins, get_plugin_manager, resolve_transport
from lmcache_core.transport import Message
from lmcache_transport_nats import NatsSettings, connect, embedded_server


def test_entry_point_registers_the_nats_transport(plugin_manager):
    spec = resolve_transport(plugin_manager, "nats")
    assert spec.plugin == "transport_nats"
    assert spec.connect is connect
    assert spec.embedded_server is embedded_server
    assert spec.settings_model is NatsSettings
    assert spec.description
    (entry,) = [p for p in describe_plugins(plugin_manager) if p["name"] == "transport_nats"]
    assert entry["distribution"] == "lmcache-transport-nats"
    assert entry["transports"] == ["nats"]
    assert entry["hooks"] == ["lmcache_transports"]


def test_disabling_the_plugin_leaves_no_nats_transport(monkeypatch):
    monkeypatch.setenv("LMCACHE_DISABLE_PLUGINS", "transport_nats")
    with pytest.raises(PluginError, match="unknown transport 'nats'"):
        resolve_transport(get_plugin_manager(), "nats")


def test_every_nats_setting_is_prefixed_and_described():
    for name, field in NatsSettings.model_fields.items():
        assert name.startswith("nats_")
        assert field.description


def test_nats_settings_join_the_root_settings_with_their_defaults(plugin_manager):
    settings = load_settings(plugin_manager)
    assert settings.nats_subject_prefix == "lmcache"
    assert settings.nats_servers == []
    assert settings.nats_max_reconnect_attempts == -1
    assert settings.nats_pending_bytes == 64 * 1024**2


def test_environment_overrides_nats_settings(plugin_manager, monkeypatch, tmp_path):
    config = tmp_path / "lmcache.yaml"
    config.write_text("nats_subject_prefix: from.file\nnats_reconnect_wait: 0.25\n")
    monkeypatch.setenv("LMCACHE_NATS_SUBJECT_PREFIX", "from.env")
    monkeypatch.setenv("LMCACHE_NATS_SERVERS", '["nats://10.0.0.1:4222", "10.0.0.2:4222"]')
    monkeypatch.setenv("LMCACHE_NATS_PASSWORD", "hunter2")
    settings = load_settings(plugin_manager, config_file=config)
    assert settings.nats_subject_prefix == "from.env"
    assert settings.nats_reconnect_wait == 0.25
    assert settings.nats_servers == ["nats://10.0.0.1:4222", "10.0.0.2:4222"]
    assert settings.nats_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize("prefix", ["a.*", "fleet.>", "has space", "a..b", ".lead"])
def test_invalid_subject_prefix_is_a_config_error_naming_the_key(
    plugin_manager, monkeypatch, prefix
):
    monkeypatch.setenv("LMCACHE_NATS_SUBJECT_PREFIX", prefix)
    with pytest.raises(ConfigError, match="nats_subject_prefix.*not a NATS subject prefix"):
        load_settings(plugin_manager)


def test_misspelled_nats_key_is_rejected_with_a_suggestion(plugin_manager, tmp_path):
    config = tmp_path / "lmcache.yaml"
    config.write_text("nats_subject_prefx: x\n")
    with pytest.raises(ConfigError, match="did you mean 'nats_subject_prefix'"):
        load_settings(plugin_manager, config_file=config)


@pytest.mark.anyio
async def test_bus_from_loaded_settings_uses_the_env_prefix(
    plugin_manager, monkeypatch, nats_url, open_bus
):
    monkeypatch.setenv("LMCACHE_NATS_SUBJECT_PREFIX", "tenant.x")
    spec = resolve_transport(plugin_manager, "nats")
    settings = load_settings(plugin_manager, controller_url=nats_url)
    observer = await open_bus(nats_url, nats_subject_prefix="")
    seen: list[str] = []

    async def record(message: Message) -> None:
        seen.append(message.topic)
        await message.respond(b"ok")

    await observer.subscribe("tenant.x.>", record)
    async with await spec.connect(settings, None) as bus:
        assert await bus.request("hello", b"", timeout=5) == b"ok"
    assert seen == ["tenant.x.hello"]
