"""Plugin discovery, name resolution and the `lmcache plugins` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmcache_core import hookimpl
from lmcache_core.errors import PluginError, UnknownLocationError
from lmcache_core.plugins import (
    backend_specs,
    controller_routers,
    get_plugin_manager,
    resolve_location,
    resolve_transport,
    settings_models,
)


def test_outside_plugin_is_discovered_through_its_entry_point(outside_plugin):
    pm = get_plugin_manager()
    specs = backend_specs(pm)
    assert "TestDictBackend" in specs
    assert specs["TestDictBackend"].plugin == "thirdloc"
    assert resolve_location(pm, "TestDictBackend").tier == 5


def test_installed_backends_register_cpu_and_disk_locations():
    specs = backend_specs(get_plugin_manager())
    assert {"LocalCPUBackend", "LocalDiskBackend"} <= set(specs)
    assert list(specs).index("LocalCPUBackend") < list(specs).index("LocalDiskBackend")


def test_two_plugins_claiming_one_location_is_an_error_naming_both(outside_plugin, monkeypatch):
    monkeypatch.setenv("THIRDLOC_CLAIM", "LocalCPUBackend")
    pm = get_plugin_manager()
    with pytest.raises(PluginError) as info:
        backend_specs(pm)
    message = str(info.value)
    assert "LocalCPUBackend" in message
    assert "'thirdloc'" in message and "'backend_cpu'" in message


def test_unknown_location_error_lists_available_locations(outside_plugin):
    pm = get_plugin_manager()
    with pytest.raises(UnknownLocationError) as info:
        resolve_location(pm, "LocalGPUBackend")
    assert str(info.value).startswith("unknown location 'LocalGPUBackend'; available: ")
    for name in ("LocalCPUBackend", "LocalDiskBackend", "TestDictBackend"):
        assert name in str(info.value)


def test_unknown_transport_error_lists_available_transports():
    with pytest.raises(PluginError, match=r"unknown transport 'carrier-pigeon'; available: .*nats"):
        resolve_transport(get_plugin_manager(), "carrier-pigeon")


def test_allow_list_loads_only_named_plugins(outside_plugin, monkeypatch):
    monkeypatch.setenv("LMCACHE_PLUGINS", "thirdloc")
    assert list(backend_specs(get_plugin_manager())) == ["TestDictBackend"]


def test_block_list_leaves_named_plugins_out(outside_plugin, monkeypatch):
    monkeypatch.setenv("LMCACHE_DISABLE_PLUGINS", "thirdloc,backend_disk")
    specs = backend_specs(get_plugin_manager())
    assert "TestDictBackend" not in specs and "LocalDiskBackend" not in specs
    assert "LocalCPUBackend" in specs


def test_misspelled_hook_is_an_error():
    class Sloppy:
        @hookimpl
        def lmcache_storage_backend(self):  # missing the final "s"
            return []

    with pytest.raises(PluginError, match="lmcache_storage_backend"):
        get_plugin_manager(extra_plugins=[Sloppy()])


def test_plugin_settings_models_are_collected(outside_plugin):
    names = {model.__name__ for _, model in settings_models(get_plugin_manager())}
    assert "ThirdLocSettings" in names


def test_builtin_controller_routes_come_through_the_hook():
    routers = controller_routers(get_plugin_manager())
    paths = {route.path for router in routers for route in router.routes}
    assert {"/lookup", "/clear"} <= paths


def test_lmcache_plugins_prints_every_plugin_as_json(outside_plugin):
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_core.cli", "plugins"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    plugins = {p["name"]: p for p in json.loads(out)}
    assert plugins["backend_cpu"]["locations"] == ["LocalCPUBackend"]
    assert plugins["backend_disk"]["locations"] == ["LocalDiskBackend"]
    assert plugins["transport_nats"]["transports"] == ["nats"]
    third = plugins["thirdloc"]
    assert third["version"] == "0.3"
    assert third["distribution"] == "lmcache-test-thirdloc"
    assert third["hooks"] == ["lmcache_settings_models", "lmcache_storage_backends"]
    assert third["locations"] == ["TestDictBackend"]
    assert "lmcache_controller_routes" in plugins["lmcache_core.controller.routes"]["hooks"]


def test_allow_list_naming_an_absent_plugin_is_an_error(monkeypatch):
    monkeypatch.setenv("LMCACHE_PLUGINS", "backend_cpu,backend_dsik")
    with pytest.raises(PluginError) as info:
        get_plugin_manager()
    message = str(info.value)
    assert "LMCACHE_PLUGINS names 'backend_dsik'" in message
    assert "installed: " in message and "backend_disk" in message
