"""The backend_disk entry point, its settings keys and its factory."""

from __future__ import annotations

from pathlib import Path

import pluggy
import pytest

from disk_helpers import Events, chunk_files, data_for, key_of
from lmcache_core.config import GIB, load_settings
from lmcache_core.errors import ConfigError
from lmcache_core.plugins import describe_plugins, resolve_location
from lmcache_backend_disk import DiskSettings, LocalDiskBackend


def test_entry_point_registers_local_disk_backend_at_tier_10(
    plugin_manager: pluggy.PluginManager,
) -> None:
    spec = resolve_location(plugin_manager, "LocalDiskBackend")
    assert spec.plugin == "backend_disk"
    assert spec.tier == 10
    assert spec.settings_model is DiskSettings
    assert spec.description
    described = {p["name"]: p for p in describe_plugins(plugin_manager)}["backend_disk"]
    assert described["distribution"] == "lmcache-backend-disk"
    assert described["locations"] == ["LocalDiskBackend"]
    assert described["hooks"] == ["lmcache_storage_backends"]


def test_location_is_enabled_only_when_local_disk_is_set(
    plugin_manager: pluggy.PluginManager, tmp_path: Path
) -> None:
    spec = resolve_location(plugin_manager, "LocalDiskBackend")
    assert not spec.enabled(load_settings(plugin_manager))
    assert spec.enabled(load_settings(plugin_manager, local_disk=str(tmp_path)))


def test_factory_builds_the_backend_from_lmcache_and_disk_keys(
    plugin_manager: pluggy.PluginManager, tmp_path: Path
) -> None:
    settings = load_settings(
        plugin_manager,
        local_disk=f"file://{tmp_path}/cache",
        max_local_disk_size=0.5,
        disk_write_queue_size=3,
        disk_queue_full_policy="drop",
        disk_fsync=False,
    )
    events = Events()
    backend = resolve_location(plugin_manager, "LocalDiskBackend").factory(settings, events.sink)
    try:
        assert isinstance(backend, LocalDiskBackend) and backend.writes_behind
        stats = backend.stats()
        assert stats["capacity_bytes"] == GIB // 2 and not stats["capacity_auto"]
        assert (stats["queue_size"], stats["queue_full_policy"], stats["fsync"]) == (3, "drop", False)
        assert backend.directory == tmp_path / "cache"
        backend.put(key_of(1), data_for(1), 16)
        assert backend.flush(timeout=30)
        assert len(chunk_files(backend.area)) == 1
        assert events.kinds() == ["ADMIT"]
    finally:
        backend.close()


def test_factory_turns_zero_capacity_into_an_automatic_one(
    plugin_manager: pluggy.PluginManager, tmp_path: Path
) -> None:
    settings = load_settings(
        plugin_manager, local_disk=str(tmp_path), disk_auto_capacity_fraction=0.1
    )
    assert settings.max_local_disk_size == 0
    backend = resolve_location(plugin_manager, "LocalDiskBackend").factory(settings, Events().sink)
    try:
        assert backend.stats()["capacity_auto"] and backend.stats()["capacity_bytes"] > 0
    finally:
        backend.close()


def test_bad_disk_setting_fails_naming_the_key(plugin_manager: pluggy.PluginManager) -> None:
    with pytest.raises(ConfigError, match="disk_queue_full_policy"):
        load_settings(plugin_manager, disk_queue_full_policy="sometimes")
    with pytest.raises(ConfigError, match="disk_write_queue_size"):
        load_settings(plugin_manager, disk_write_queue_size=0)


def test_every_disk_setting_has_a_description() -> None:
    for name, field in DiskSettings.model_fields.items():
        assert name.startswith("disk_") and field.description, name
