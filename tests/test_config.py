"""Configuration: LMCache's YAML files, env overrides, plugin keys and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.plugins import get_plugin_manager

PUSH_YAML = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5
# cache controller configurations
enable_controller: True
lmcache_instance_id: "lmcache_default_instance"
controller_url: "localhost:9001"
distributed_url: "localhost:8002"
lmcache_worker_port: 8001
"""

PULL_YAML = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5
enable_controller: True
lmcache_instance_id: "lmcache_default_instance"
controller_pull_url: "localhost:9001"
lmcache_worker_ports: 8001
p2p_host: "localhost"
p2p_init_ports: 8200
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_lmcache():
    s = load_settings()
    assert (s.chunk_size, s.local_cpu, s.max_local_cpu_size) == (256, True, 5.0)
    assert s.local_disk is None and s.enable_controller is False
    assert s.lmcache_instance_id == "lmcache_default_instance"


def test_push_example_file_loads_from_lmcache_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(write(tmp_path, PUSH_YAML)))
    s = load_settings()
    assert s.enable_controller and s.controller_url == "localhost:9001"
    assert s.controller_address == "localhost:9001"
    assert s.distributed_url == "localhost:8002" and s.lmcache_worker_port == 8001
    assert s.max_local_cpu_bytes == 5 * 1024**3


def test_pull_example_file_loads(tmp_path):
    s = load_settings(config_file=write(tmp_path, PULL_YAML))
    assert s.controller_pull_url == "localhost:9001" and s.controller_address == "localhost:9001"
    assert s.lmcache_worker_ports == 8001 and s.p2p_init_ports == 8200 and s.p2p_host == "localhost"


def test_port_keys_take_an_int_or_a_list(tmp_path):
    s = load_settings(config_file=write(tmp_path, "lmcache_worker_ports: [8001, 8002]\np2p_init_ports: [1, 2]\n"))
    assert s.lmcache_worker_ports == [8001, 8002] and s.p2p_init_ports == [1, 2]


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(write(tmp_path, PUSH_YAML)))
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "16")
    monkeypatch.setenv("LMCACHE_LMCACHE_INSTANCE_ID", "from-env")
    s = load_settings()
    assert s.chunk_size == 16 and s.lmcache_instance_id == "from-env"
    assert s.controller_url == "localhost:9001"


def test_local_disk_accepts_a_path_or_a_file_url(tmp_path):
    assert load_settings(local_disk=f"file://{tmp_path}/cache").local_disk_path == tmp_path / "cache"
    assert load_settings(local_disk=str(tmp_path)).local_disk_path == tmp_path


def test_unknown_key_names_it_and_the_closest_known_key(tmp_path):
    path = write(tmp_path, "chunk_size: 256\nmax_local_cpu_sise: 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    message = str(info.value)
    assert "unknown config key 'max_local_cpu_sise'" in message
    assert "did you mean 'max_local_cpu_size'?" in message
    assert str(path) in message


def test_bad_value_names_the_key_the_value_and_what_is_expected(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=write(tmp_path, "chunk_size: lots\n"))
    message = str(info.value)
    assert "'chunk_size'" in message and "'lots'" in message and "integer" in message


def test_non_positive_chunk_size_is_rejected(monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "0")
    with pytest.raises(ConfigError, match="'chunk_size'.*greater than 0"):
        load_settings()


def test_missing_file_and_non_mapping_yaml_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(config_file=write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config_file=write(tmp_path, "chunk_size: [\n"))


def test_plugin_keys_join_the_root_settings(outside_plugin, tmp_path, monkeypatch):
    pm = get_plugin_manager()
    assert load_settings(pm).thirdloc_enabled is True
    assert load_settings(pm, config_file=write(tmp_path, "thirdloc_enabled: false\n")).thirdloc_enabled is False
    monkeypatch.setenv("LMCACHE_THIRDLOC_ENABLED", "true")
    assert load_settings(pm, config_file=tmp_path / "config.yaml").thirdloc_enabled is True
    with pytest.raises(ConfigError, match="did you mean 'thirdloc_enabled'"):
        load_settings(pm, thirdloc_enable=False)


def test_two_plugins_declaring_one_key_is_an_error(outside_plugin):
    from pydantic import BaseModel, Field

    from lmcache_core import hookimpl

    class Clash:
        class Model(BaseModel):
            thirdloc_enabled: bool = Field(False, description="clash")

        @hookimpl
        def lmcache_settings_models(self):
            return [self.Model]

    pm = get_plugin_manager(extra_plugins=[Clash()])
    with pytest.raises(PluginError, match="'thirdloc_enabled' is declared by two plugins"):
        load_settings(pm)


def test_every_key_has_a_description():
    from lmcache_core.config import LMCacheSettings

    missing = [name for name, f in LMCacheSettings.model_fields.items() if not f.description]
    assert missing == []


LMCACHE_ONLY_YAML = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5
remote_url: "lm://localhost:65432"
remote_serde: "naive"
save_unfull_chunk: False
enable_pd: False
blend_special_str: " # # "
pd_role: "sender"
nixl_buffer_size: 1073741824
extra_config: {"enable_nixl_storage": false}
internal_api_server_port_start: 6999
"""


def unused_key_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "lmcache-core does not use" in r.getMessage()
    ]


def test_lmcache_keys_we_do_not_use_load_with_one_warning_naming_them(tmp_path, caplog):
    path = write(tmp_path, LMCACHE_ONLY_YAML)
    with caplog.at_level("WARNING", logger="lmcache_core.config"):
        s = load_settings(config_file=path)
    assert (s.chunk_size, s.local_cpu, s.max_local_cpu_size) == (256, True, 5.0)
    assert not hasattr(s, "remote_url")
    (message,) = unused_key_warnings(caplog)
    ignored = (
        "remote_url", "remote_serde", "save_unfull_chunk", "enable_pd", "blend_special_str",
        "pd_role", "nixl_buffer_size", "extra_config", "internal_api_server_port_start",
    )
    for key in ignored:
        assert f"{key} (from {path})" in message
    assert "ignoring" in message and "chunk_size" not in message


def test_lmcache_keys_we_do_not_use_are_accepted_from_the_environment(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(write(tmp_path, "remote_url: lm://x:1\n")))
    monkeypatch.setenv("LMCACHE_SAVE_DECODE_CACHE", "true")
    monkeypatch.setenv("LMCACHE_LOOKUP_URL", "localhost:8100")
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "64")
    with caplog.at_level("WARNING", logger="lmcache_core.config"):
        s = load_settings()
    assert s.chunk_size == 64
    (message,) = unused_key_warnings(caplog)
    assert "save_decode_cache (from LMCACHE_SAVE_DECODE_CACHE)" in message
    assert "lookup_url (from LMCACHE_LOOKUP_URL)" in message
    assert "remote_url (from" in message and "chunk_size" not in message


def test_a_file_of_only_our_keys_warns_about_nothing(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="lmcache_core.config"):
        load_settings(config_file=write(tmp_path, PULL_YAML))
    assert unused_key_warnings(caplog) == []


def test_misspelt_key_beside_lmcache_keys_still_fails_naming_the_closest(tmp_path):
    path = write(tmp_path, LMCACHE_ONLY_YAML + "max_local_disk_sise: 5\nremote_urll: x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    message = str(info.value)
    assert "unknown config key 'max_local_disk_sise'" in message
    assert "did you mean 'max_local_disk_size'?" in message
    assert "unknown config key 'remote_urll'" in message and "did you mean 'remote_url'?" in message
    assert "'remote_serde'" not in message  # the keys LMCache knows are still accepted


def test_misspelt_keyword_argument_fails_but_an_lmcache_one_is_ignored():
    assert load_settings(use_layerwise=True).chunk_size == 256
    with pytest.raises(ConfigError, match="did you mean 'chunk_size'"):
        load_settings(chunk_sizes=16)
