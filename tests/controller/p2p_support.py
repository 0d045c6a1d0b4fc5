"""Helpers of the peer-to-peer tests: a serving instance process and its settings (the TCP proxy
that corrupts or stalls a transfer is ``lmcache_core.testing.Proxy``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmcache_core.testing import free_port

from .support import REPO, InstanceProcess

sys.path.insert(0, str(REPO / "examples"))
from instance import kv_for  # noqa: E402  (the stand-in instance's deterministic KV)

SECRET = "peer-secret-for-tests"


def p2p_env(port: int, secret: str | None = SECRET, **extra: Any) -> dict[str, str]:
    env = {"LMCACHE_ENABLE_P2P": "true", "LMCACHE_P2P_HOST": "127.0.0.1", "LMCACHE_P2P_INIT_PORTS": str(port)}
    if secret is not None:
        env["LMCACHE_P2P_SECRET"] = secret
    env.update({f"LMCACHE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def serving_instance(nats_url: str, tmp: Path, instance_id: str, args: list[str], **extra: Any) -> tuple[InstanceProcess, str]:
    """``examples/instance.py`` with the peer channel on; returns it and its peer URL."""
    port = free_port()
    (tmp / instance_id).mkdir(parents=True, exist_ok=True)
    proc = InstanceProcess(
        nats_url, tmp / instance_id, instance_id=instance_id, args=["--log-level", "INFO", *args],
        disk=False, env=p2p_env(port, **extra),
    )
    return proc, f"127.0.0.1:{port}"


def p2p_settings(port: int | None = None, secret: str | None = SECRET) -> dict[str, Any]:
    """Settings of an in-process instance with the peer channel on."""
    settings: dict[str, Any] = {"enable_p2p": True, "p2p_host": "127.0.0.1", "p2p_init_ports": port or free_port()}
    if secret is not None:
        settings["p2p_secret"] = secret
    return settings
