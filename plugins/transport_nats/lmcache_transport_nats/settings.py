"""The ``nats_*`` configuration keys, which join lmcache's root settings (env ``LMCACHE_NATS_*``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, SecretStr, ValidationError

from pydantic_settings import NoDecode

from lmcache_core.errors import ConfigError
from lmcache_core.wire import InstanceId

MIB = 1024**2

# A subject token is anything but separators, wildcards and whitespace (NATS subject rules).
_TOKEN = r"[^.\s*>]+"
_PREFIX_RE = re.compile(rf"{_TOKEN}(\.{_TOKEN})*")


def _check_subject_prefix(value: str) -> str:
    # Validators live in the annotation (not as model validators) so they survive the merge of
    # these fields into the root settings class, which copies fields one by one.
    if value == "" or _PREFIX_RE.fullmatch(value):
        return value
    raise ValueError(
        f"{value!r} is not a NATS subject prefix: use dot-separated tokens without spaces, "
        "'*' or '>' (for example 'lmcache' or 'prod.lmcache')"
    )


def split_server_urls(value: str) -> list[str]:
    """``"a:4222, b:4222"`` -> ``["a:4222", "b:4222"]``: one text naming several servers."""
    return [part.strip() for part in value.split(",")]


def _servers_from_text(value: Any) -> Any:
    # env values and --nats-url are text: a JSON list, or URLs separated by commas
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return split_server_urls(text) if text else []
    return value


def _check_servers(value: list[str]) -> list[str]:
    for url in value:
        if not url.strip():
            raise ValueError("server URLs must not be empty")
    return value


def _check_user_nkey(value: str) -> str:
    if _USER_NKEY_RE.fullmatch(value):
        return value
    raise ValueError(f"{value[:8]!r}... is not a public user nkey: 56 characters A-Z and 2-7, starting with 'U'")


_USER_NKEY_RE = re.compile(r"U[A-Z2-7]{55}")
SubjectPrefix = Annotated[str, AfterValidator(_check_subject_prefix)]
UserNkey = Annotated[str, AfterValidator(_check_user_nkey)]
ServerList = Annotated[
    list[str], NoDecode, BeforeValidator(_servers_from_text), AfterValidator(_check_servers)
]


class NatsSettings(BaseModel):
    """Connection settings of the NATS transport (keys ``nats_*``)."""

    nats_servers: ServerList = Field(
        default_factory=list,
        description=(
            "NATS server URLs of a cluster (host:port, nats://host:port or tls://host:port): a "
            "YAML list, or in the environment URLs separated by commas (or a JSON list); the "
            "client connects to one and fails over to the others. Empty: the URL the caller "
            "passes (controller_url for workers), which may itself list several, comma-separated."
        ),
    )
    nats_randomize_servers: bool = Field(
        True,
        description=(
            "Try the servers in a random order (spreads a fleet over the cluster); false: in "
            "the order given, so each client can prefer its nearest node."
        ),
    )
    nats_subject_prefix: SubjectPrefix = Field(
        "lmcache",
        description=(
            "Prefix put in front of every topic, so several fleets can share one server; "
            "dot-separated tokens without wildcards ('' for none)."
        ),
    )
    nats_user: str | None = Field(None, description="User name for NATS user/password auth.")
    nats_password: SecretStr | None = Field(
        None, description="Password for NATS user/password auth (with nats_user)."
    )
    nats_token: SecretStr | None = Field(None, description="Token for NATS token auth.")
    nats_instance_passwords: dict[InstanceId, SecretStr] = Field(
        default_factory=dict,
        description=(
            "Controller side: instance id -> password of that instance's bus user (whose user "
            "name is the instance id), for the embedded server and 'python -m "
            "lmcache_transport_nats.auth_config'; each such user may publish only its own instance's "
            "events, heartbeats and registrations and hear only its own commands and the hello. "
            "Needs nats_user and nats_password (the controller's own user)."
        ),
    )
    nats_nkey_seed_file: Path | None = Field(
        None,
        description=(
            "A file holding this client's NATS nkey seed ('SU...'): it signs the server's "
            "challenge, so no shared secret travels; the server knows only its public key "
            "(make one with 'python -m lmcache_transport_nats.auth_config --new-nkey FILE')."
        ),
    )
    nats_instance_nkeys: dict[InstanceId, UserNkey] = Field(
        default_factory=dict,
        description=(
            "Controller side, like nats_instance_passwords: instance id -> public nkey ('U...') "
            "of that instance's bus user, which signs with its nats_nkey_seed_file."
        ),
    )
    nats_creds_file: Path | None = Field(
        None, description="A NATS .creds file (JWT + nkey seed) for decentralised auth."
    )
    nats_tls_ca_file: Path | None = Field(
        None, description="CA bundle that verifies the server's TLS certificate."
    )
    nats_tls_cert_file: Path | None = Field(
        None, description="Client certificate for mutual TLS (with nats_tls_key_file)."
    )
    nats_tls_key_file: Path | None = Field(
        None, description="Private key of the client certificate for mutual TLS."
    )
    nats_connect_timeout: float = Field(
        2.0,
        gt=0,
        description=(
            "Seconds to wait for the first connection (every server, retries included) and "
            "for each later connection attempt."
        ),
    )
    nats_max_reconnect_attempts: int = Field(
        -1, ge=-1, description="Reconnection attempts per server after a disconnect (-1: forever)."
    )
    nats_reconnect_wait: float = Field(
        0.5, gt=0, description="Seconds between reconnection attempts to one server."
    )
    nats_pending_bytes: int = Field(
        64 * MIB,
        gt=0,
        description=(
            "Bytes of publishes kept while disconnected and sent after reconnecting; a publish "
            "beyond it fails with TransportError."
        ),
    )


def nats_settings_from(settings: Any) -> NatsSettings:
    """The ``nats_*`` values of ``settings`` (root settings or a ``NatsSettings``), defaults elsewhere.

    Root settings built without the plugin manager lack the ``nats_*`` fields; the defaults
    apply then, so ``connect(LMCacheSettings(), url)`` works.
    """
    if isinstance(settings, NatsSettings):
        return settings
    values = {
        name: getattr(settings, name)
        for name in NatsSettings.model_fields
        if settings is not None and hasattr(settings, name)
    }
    try:
        return NatsSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"bad NATS settings: {exc}") from None
