"""Discovery through the ``lmcache`` entry point and the factory built from settings."""

from __future__ import annotations

import os

import pluggy
import torch

from lmcache_core.config import load_settings
from lmcache_core.events import EventBus
from lmcache_core.plugins import backend_specs, describe_plugins, resolve_location

from lmcache_backend_cpu import LocalCPUBackend


def test_entry_point_registers_local_cpu_backend(plugin_manager: pluggy.PluginManager) -> None:
    specs = backend_specs(plugin_manager)
    assert "LocalCPUBackend" in specs
    spec = specs["LocalCPUBackend"]
    assert spec.plugin == "backend_cpu" and spec.tier == 0 and spec.description
    described = {p["name"]: p for p in describe_plugins(plugin_manager)}
    assert described["backend_cpu"]["distribution"] == "lmcache-backend-cpu"
    assert described["backend_cpu"]["locations"] == ["LocalCPUBackend"]


def test_factory_sizes_the_pool_from_max_local_cpu_size(plugin_manager: pluggy.PluginManager) -> None:
    spec = resolve_location(plugin_manager, "LocalCPUBackend")
    settings = load_settings(config_file=os.devnull, max_local_cpu_size=0.001)
    backend = spec.factory(settings, EventBus().sink("LocalCPUBackend"))
    try:
        assert isinstance(backend, LocalCPUBackend)
        assert backend.stats()["capacity_bytes"] == settings.max_local_cpu_bytes == int(0.001 * 1024**3)
        assert backend.stats()["pinned_pool"] == torch.cuda.is_available()
    finally:
        backend.close()


def test_enabled_follows_the_local_cpu_setting(plugin_manager: pluggy.PluginManager) -> None:
    spec = resolve_location(plugin_manager, "LocalCPUBackend")
    assert spec.enabled(load_settings(config_file=os.devnull, local_cpu=True))
    assert not spec.enabled(load_settings(config_file=os.devnull, local_cpu=False))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_pool_commits_no_memory_until_written() -> None:
    before = _resident_bytes()
    backend = LocalCPUBackend(4 * 1024**3, EventBus().sink("LocalCPUBackend"), pin_memory=False)
    try:
        assert _resident_bytes() - before < 64 * 1024**2
    finally:
        backend.close()
