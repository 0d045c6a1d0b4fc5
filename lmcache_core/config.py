"""Configuration: one root settings class, read from YAML and ``LMCACHE_*`` environment variables.

Precedence (highest first): keyword arguments, ``LMCACHE_<KEY>`` environment variables, the
YAML file named by ``LMCACHE_CONFIG_FILE`` (or passed explicitly), defaults. Keys and meanings
follow LMCache's configuration files so existing files keep working; plugins add their own keys
through the ``lmcache_settings_models`` hook (or a spec's ``settings_model``).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Union

import pluggy
import yaml
from pydantic import Field, SecretStr, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.wire import check_instance_id

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
#: what an HTTP bearer token may contain
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
GIB = 1024**3

#: Keys of LMCache's own configuration that lmcache-core has no use for (remote stores,
#: blending, P2P/PD transfer, NIXL, GDS, LMCache's internal servers and allocators...).
#: They are accepted from the file, the environment and keyword arguments, and one warning
#: per load names them; any other unknown key is an error. Keys we do read are fields.
UNUSED_LMCACHE_KEYS = frozenset(
    {
        "app_id",
        "audit_actual_remote_url",
        "blocking_timeout_secs",
        "cache_policy",
        "controller_reply_url",
        "cufile_buffer_size",
        "enable_async_loading",
        "enable_blending",
        "enable_chunk_statistics",
        "enable_hidden_state_cache",
        "enable_kv_events",
        "enable_lazy_memory_allocator",
        "enable_nixl",
        "enable_pd",
        "enable_scheduler_bypass_lookup",
        "enable_xpyd",
        "external_backends",
        "external_lookup_client",
        "extra_config",
        "gds_backend",
        "gds_buffer_size",
        "gds_path",
        "gds_path_sharding",
        "hidden_state_layers",
        "hidden_states_retrieve_mode",
        "hit_miss_ratio",
        "local_cpu_use_hugepages",
        "local_device",
        "local_disk_path_sharding",
        "lmcache_worker_heartbeat_delay_time",
        "lmcache_worker_heartbeat_time",
        "lmcache_worker_ids",
        "maru_path",
        "maru_pool_size",
        "max_hidden_state_cpu_size",
        "min_retrieve_tokens",
        "mp_host",
        "mp_port",
        "numa_mode",
        "p2p_lookup_ports",
        "pin_check_interval_sec",
        "pin_timeout_sec",
        "pipelined_backend",
        "plugin_locations",
        "pre_caching_hash_algorithm",
        "priority_limit",
        "py_enable_gc",
        "remote_config_url",
        "remote_serde",
        "remote_storage_plugins",
        "remote_url",
        "reserve_local_cpu_size",
        "retrieve_locations",
        "runtime_plugin_locations",
        "save_decode_cache",
        "save_unfull_chunk",
        "script_allowed_imports",
        "storage_plugins",
        "store_location",
        "transfer_channel",
        "use_gds",
        "use_gpu_connector_v3",
        "use_layerwise",
        "weka_path",
    }
)
#: Whole families of LMCache keys we do not use (``blend_recompute_ratios``, ``pd_role``, ...).
UNUSED_LMCACHE_KEY_PREFIXES = (
    "blend_",
    "chunk_statistics_",
    "cost_aware_",
    "internal_api_server_",
    "lazy_memory_",
    "lookup_",
    "nixl_",
    "pd_",
)

IntOrList = Union[int, list[int]]


class LMCacheSettings(BaseSettings):
    """Root settings of an lmcache instance (and of the controller, for the ``controller_*`` keys)."""

    model_config = SettingsConfigDict(
        env_prefix="LMCACHE_", extra="forbid", validate_default=True, frozen=True
    )

    # --- LMCache-compatible keys -------------------------------------------------------------
    chunk_size: int = Field(256, gt=0, description="Tokens per chunk (the last chunk may be shorter).")
    local_cpu: bool = Field(True, description="Keep chunks in CPU memory (LocalCPUBackend).")
    max_local_cpu_size: float = Field(
        5.0, ge=0, description="Capacity of LocalCPUBackend in GB (GiB, 1024**3 bytes)."
    )
    local_disk: str | None = Field(
        None,
        description="Directory of LocalDiskBackend, as a path or a file:// URL; unset disables it.",
    )
    max_local_disk_size: float = Field(
        0.0, ge=0, description="Capacity of LocalDiskBackend in GB (GiB, 1024**3 bytes)."
    )
    enable_controller: bool = Field(
        False, description="Start a worker that reports to the cache controller."
    )
    lmcache_instance_id: str = Field(
        "lmcache_default_instance", min_length=1, description="This instance's id at the controller."
    )
    controller_url: str | None = Field(
        None,
        description=(
            "host:port of the controller's message bus (its --monitor-port), or the URLs of a "
            "NATS cluster separated by commas (the worker connects to one and fails over)."
        ),
    )
    controller_pull_url: str | None = Field(
        None, description="Same as controller_url (LMCache's name in its pull mode)."
    )
    distributed_url: str | None = Field(
        None, description="Accepted for LMCache compatibility; not needed with a message bus."
    )
    lmcache_worker_port: int | None = Field(
        None, description="Accepted for LMCache compatibility; not needed with a message bus."
    )
    lmcache_worker_ports: IntOrList | None = Field(
        None, description="Accepted for LMCache compatibility; not needed with a message bus."
    )
    p2p_host: str | None = Field(
        None,
        description="Host name or address this instance's peer channel listens on and peers reach "
        "it at (with enable_p2p); a host that is not loopback needs p2p_secret or nats_token.",
    )
    p2p_advertise_host: str | None = Field(
        None,
        description="Host name or address peers reach this instance's peer channel at, when it "
        "is not p2p_host (a wildcard bind like 0.0.0.0, NAT, a proxy). Default: p2p_host, or for "
        "a wildcard p2p_host this machine's address on its route to the bus.",
    )
    p2p_init_ports: IntOrList | None = Field(
        None,
        description="Ports of the peer channel, one per tensor-parallel rank (rank r listens on "
        "the r-th; one int: rank 0 only).",
    )
    enable_p2p: bool = Field(
        False,
        description="Serve this instance's chunks to peers at p2p_host:p2p_init_ports[rank] and, on "
        "a local miss, fetch a prefix that the controller says a peer holds (needs enable_controller).",
    )

    # --- lmcache-core keys -------------------------------------------------------------------
    namespace: str = Field(
        "", description="Salt mixed into every chunk hash, isolating tenants that share storage."
    )
    transport: str = Field("nats", description="Message-bus transport plugin used by workers.")
    store_codecs: dict[str, str] = Field(
        default_factory=dict,
        description="Per location, the chunk codec chunks are encoded with when stored there "
        "(e.g. {LocalCPUBackend: zstd}); a location not named stores chunks as they are. "
        "Codecs come from plugins ('lmcache plugins' lists them).",
    )
    worker_heartbeat_interval: float = Field(
        1.0, gt=0, description="Seconds between a worker's heartbeats."
    )
    worker_event_batch_size: int = Field(
        4096, gt=0, description="Most KV events a worker publishes in one message."
    )
    worker_event_flush_interval: float = Field(
        0.005, gt=0, description="Longest a worker holds a KV event before publishing it (seconds)."
    )
    worker_replay_batches: int = Field(
        1024, ge=0, description="Most recent event batches a worker retains to replay a range the "
        "controller missed (older ones: a full resync of that location instead)."
    )
    worker_replay_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="Most bytes of recent event batches a worker retains for replays."
    )
    controller_gap_grace: float = Field(
        1.0, gt=0, description="Seconds a sequence gap may stand (the missing batches only delayed) "
        "before the controller asks that worker to replay the range."
    )
    controller_recovery_window: int = Field(
        32, ge=1, description="Workers whose inventories the controller pulls at once after it starts or "
        "meets a run it does not know (each has one page in flight: this bounds the recovery's traffic)."
    )
    controller_inventory_page: int = Field(
        16_384, ge=1, le=32_768, description="Entries per inventory page the controller asks a worker for."
    )
    controller_heartbeat_timeout: float = Field(
        5.0, gt=0, description="Seconds without a heartbeat after which the controller drops a worker."
    )
    controller_command_timeout: float = Field(
        5.0, gt=0, description="Seconds the controller waits for a worker to answer a command."
    )
    controller_api_token: str | None = Field(
        None,
        description="When set, every controller endpoint requires 'Authorization: Bearer <token>' "
        "(visible ASCII, no spaces; unset: no token).",
        json_schema_extra={"secret": True},
    )
    controller_max_lookup_tokens: int = Field(
        1_048_576, gt=0, description="Longest token list /lookup accepts (longer gets HTTP 413)."
    )
    controller_max_request_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Largest /lookup body accepted, checked before reading it (larger gets HTTP 413); "
        "other endpoints take 64 KiB.",
    )
    controller_request_timeout: float = Field(
        30.0, gt=0, description="Seconds a client has to send a request body (slower gets HTTP 408)."
    )

    p2p_secret: SecretStr | None = Field(
        None,
        description="Shared secret of the fleet's peer channel (HMAC challenge-response both ways); "
        "unset: the bus's nats_token; neither: no authentication, allowed on loopback only.",
    )
    p2p_timeout: float = Field(
        5.0, gt=0, description="Seconds a peer may take for any one step of a transfer (connect, "
        "handshake, a chunk's bytes) before the transfer is abandoned."
    )
    p2p_fetch_timeout: float = Field(
        3.0, gt=0, description="Longest a fetch on a local miss may take in all (the rest of the "
        "prompt is computed instead)."
    )
    p2p_max_chunk_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Largest chunk a peer may send or push: the most bytes "
        "one transfer holds in flight (a larger one is refused before any memory is taken)."
    )

    _file_values: ClassVar[dict[str, Any]] = {}

    @field_validator("lmcache_instance_id")
    @classmethod
    def _check_instance_id(cls, value: str) -> str:
        return check_instance_id(value)

    @field_validator("controller_api_token")
    @classmethod
    def _check_api_token(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty token would turn authentication off; leave the key unset to run without one")
        if not _TOKEN_CHARS.fullmatch(value):
            raise ValueError("a bearer token is visible ASCII characters without spaces")
        return value

    @field_validator("local_disk")
    @classmethod
    def _check_local_disk(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a directory path or a file:// URL, got an empty string")
        return value

    @property
    def local_disk_path(self) -> Path | None:
        """``local_disk`` as a path (a ``file://`` prefix removed), or None when unset."""
        if self.local_disk is None:
            return None
        value = self.local_disk
        if value.startswith("file://"):
            value = value[len("file://") :]
        return Path(value).expanduser()

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GIB)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GIB)

    @property
    def controller_address(self) -> str | None:
        """Where the worker reaches the controller's bus: controller_url or controller_pull_url."""
        return self.controller_url or self.controller_pull_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls, cls._file_values))


class _FileSource(PydanticBaseSettingsSource):
    """The config file's values, read (and checked to be a mapping) by ``load_settings``."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def _read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file's top-level mapping (empty for an empty file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def is_unused_lmcache_key(key: str) -> bool:
    """True for a key of LMCache's configuration that lmcache-core accepts and ignores."""
    return key in UNUSED_LMCACHE_KEYS or key.startswith(UNUSED_LMCACHE_KEY_PREFIXES)


def _split_unused(
    values: dict[str, Any], known: set[str], origin: str, ignored: dict[str, str]
) -> dict[str, Any]:
    """``values`` without LMCache's unused keys; each dropped key is recorded in ``ignored``."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(key, str) and key not in known and is_unused_lmcache_key(key):
            ignored.setdefault(key, origin)
        else:
            kept[key] = value
    return kept


def _unused_env_keys(known: set[str], ignored: dict[str, str]) -> None:
    """Record ``LMCACHE_<KEY>`` variables naming unused LMCache keys (env names ignore case,
    as the settings' own do). Other unknown variables stay ignored, as they always were:
    ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_PLUGINS`` are not settings keys either."""
    for name in sorted(os.environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in known and is_unused_lmcache_key(key):
            ignored.setdefault(key, name)


def settings_class(pm: pluggy.PluginManager | None = None) -> type[LMCacheSettings]:
    """The root settings class extended with every plugin's settings fields."""
    if pm is None:
        return LMCacheSettings
    from lmcache_core.plugins import settings_models

    fields: dict[str, Any] = {}
    owners: dict[str, str] = {name: "lmcache-core" for name in LMCacheSettings.model_fields}
    for plugin, model in settings_models(pm):
        for name, info in model.model_fields.items():
            if name in owners:
                raise PluginError(
                    f"settings key '{name}' is declared by two plugins: '{owners[name]}' and '{plugin}'"
                )
            owners[name] = plugin
            fields[name] = (info.annotation, info)
    if not fields:
        return LMCacheSettings
    return create_model("LMCacheSettingsWithPlugins", __base__=LMCacheSettings, **fields)


def load_settings(
    pm: pluggy.PluginManager | None = None,
    config_file: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> LMCacheSettings:
    """Read the settings; ``ConfigError`` names the offending key and what it expects.

    Keys of LMCache's configuration that lmcache-core does not use are dropped, and one
    warning names them all (with where each came from).
    """
    cls = settings_class(pm)
    path = config_file if config_file is not None else os.environ.get(CONFIG_FILE_ENV)
    path_obj = Path(path) if path else None
    known = set(cls.model_fields)
    ignored: dict[str, str] = {}
    file_values = _read_config_file(path_obj) if path_obj is not None else {}
    file_values = _split_unused(file_values, known, str(path_obj), ignored)
    _unused_env_keys(known, ignored)
    overrides = _split_unused(overrides, known, "keyword argument", ignored)
    if ignored:
        logger.warning(
            "ignoring config keys that LMCache knows but lmcache-core does not use: %s",
            ", ".join(f"{key} (from {origin})" for key, origin in sorted(ignored.items())),
        )

    # a fresh subclass carries the file's values, so concurrent loads never share state
    bound = type(cls.__name__, (cls,), {"_file_values": file_values, "__module__": cls.__module__})
    try:
        return bound(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, cls, path_obj)) from None


def _explain(exc: ValidationError, cls: type[LMCacheSettings], path: Path | None) -> str:
    where = f" in {path}" if path else ""
    known = list(cls.model_fields)
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        top = str(err["loc"][0]) if err["loc"] else key
        if err["type"] == "extra_forbidden":
            # LMCache's unused keys are candidates too: a misspelt one is then named correctly
            candidates = known + sorted(UNUSED_LMCACHE_KEYS)
            close = difflib.get_close_matches(top, candidates, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            lines.append(f"unknown config key '{top}'{where}{hint}")
        else:
            field = cls.model_fields.get(top)
            expected = field.description if field is not None and field.description else ""
            extra = field.json_schema_extra if field is not None else None
            secret = isinstance(extra, dict) and extra.get("secret")  # never echo a token
            got = "a hidden value" if secret else repr(err.get("input"))
            lines.append(
                f"bad value for config key '{key}'{where}: got {got}: {err['msg']}"
                + (f" (expected: {expected})" if expected else "")
            )
    return "; ".join(lines)
