"""Setting the connector up: its vLLM name, its entry points, its settings (in this process)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pluggy
import pytest
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError

from lmcache_connector_vllm import CONNECTOR_NAME
from lmcache_connector_vllm.connector import LMCacheConnectorV1, _settings_for_rank
from lmcache_connector_vllm.registration import register


def test_register_is_idempotent_and_resolves_to_our_class() -> None:
    register()
    register()  # vLLM may load general plugins more than once per process
    assert KVConnectorFactory.get_connector_class_by_name(CONNECTOR_NAME) is LMCacheConnectorV1


def test_register_leaves_vllms_own_lmcache_connector_name_alone() -> None:
    builtin_loader = KVConnectorFactory._registry["LMCacheConnectorV1"]
    register()
    assert KVConnectorFactory._registry["LMCacheConnectorV1"] is builtin_loader
    assert CONNECTOR_NAME != "LMCacheConnectorV1"


def test_entry_points_are_declared_for_vllm_and_lmcache() -> None:
    dist = importlib.metadata.distribution("lmcache-connector-vllm")
    groups = {(ep.group, ep.value) for ep in dist.entry_points}
    assert ("vllm.general_plugins", "lmcache_connector_vllm.registration:register") in groups
    assert ("lmcache", "lmcache_connector_vllm.plugin") in groups


def test_connector_settings_key_is_validated_with_the_plugin_loaded(
    plugin_manager: pluggy.PluginManager,
) -> None:
    settings = load_settings(plugin_manager, connector_vllm_lookup_timeout=2.5)
    assert settings.connector_vllm_lookup_timeout == 2.5
    with pytest.raises(ConfigError, match="connector_vllm_lookup_timeout"):
        load_settings(plugin_manager, connector_vllm_lookup_timeout=-1)


def test_each_rank_of_a_tensor_parallel_instance_gets_its_own_disk_directory(tmp_path: Path) -> None:
    settings = load_settings(local_disk=f"file://{tmp_path}/disk")
    assert _settings_for_rank(settings, 0, 1).local_disk_path == tmp_path / "disk"
    assert _settings_for_rank(settings, 1, 2).local_disk_path == tmp_path / "disk" / "rank1"
    cpu_only = load_settings()
    assert _settings_for_rank(cpu_only, 1, 2) is cpu_only
