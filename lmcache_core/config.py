"""Configuration: one root settings class, read from YAML and ``LMCACHE_*`` environment variables.

Precedence (highest first): keyword arguments, ``LMCACHE_<KEY>`` environment variables, the
YAML file named by ``LMCACHE_CONFIG_FILE`` (or passed explicitly), defaults. Keys and meanings
follow LMCache's configuration files so existing files keep working; plugins add their own keys
through the ``lmcache_settings_models`` hook (or a spec's ``settings_model``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Union

import pluggy
import yaml
from pydantic import Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.wire import check_instance_id

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
#: what an HTTP bearer token may contain
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
GIB = 1024**3

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
        None, description="host:port of the controller's message bus (its --monitor-port)."
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
        None, description="Accepted for LMCache compatibility; peer-to-peer transfer is not used."
    )
    p2p_init_ports: IntOrList | None = Field(
        None, description="Accepted for LMCache compatibility; peer-to-peer transfer is not used."
    )

    # --- lmcache-core keys -------------------------------------------------------------------
    namespace: str = Field(
        "", description="Salt mixed into every chunk hash, isolating tenants that share storage."
    )
    transport: str = Field("nats", description="Message-bus transport plugin used by workers.")
    worker_heartbeat_interval: float = Field(
        1.0, gt=0, description="Seconds between a worker's heartbeats."
    )
    worker_event_batch_size: int = Field(
        4096, gt=0, description="Most KV events a worker publishes in one message."
    )
    worker_event_flush_interval: float = Field(
        0.005, gt=0, description="Longest a worker holds a KV event before publishing it (seconds)."
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

    _config_file: ClassVar[Path | None] = None

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
        return (init_settings, env_settings, _YamlSource(settings_cls, cls._config_file))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file; its top level must be a mapping of settings keys."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {self.path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {self.path} is not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {self.path} must hold a mapping of keys to values, "
                f"got {type(data).__name__}"
            )
        return data


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
    """Read the settings; ``ConfigError`` names the offending key and what it expects."""
    cls = settings_class(pm)
    path = config_file if config_file is not None else os.environ.get(CONFIG_FILE_ENV)
    path_obj = Path(path) if path else None

    # a fresh subclass carries the file path, so concurrent loads never share state
    bound = type(cls.__name__, (cls,), {"_config_file": path_obj, "__module__": cls.__module__})
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
            close = difflib.get_close_matches(top, known, n=1, cutoff=0.5)
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
