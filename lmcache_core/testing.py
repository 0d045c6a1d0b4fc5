"""Reusable pytest fixtures for lmcache-core and its plugins (a pytest plugin, ``-p lmcache``).

Installed with lmcache-core through the ``pytest11`` entry point, so outside plugin authors get
the same fixtures: a fresh plugin manager, settings bound to a temporary directory, and (with
the NATS transport installed) a real ``nats-server`` on a free port.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pluggy
import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[pluggy.PluginManager]:
    """A fresh plugin manager with every installed plugin, unaffected by the caller's env switches."""
    from lmcache_core.plugins import get_plugin_manager

    monkeypatch.delenv("LMCACHE_PLUGINS", raising=False)
    monkeypatch.delenv("LMCACHE_DISABLE_PLUGINS", raising=False)
    yield get_plugin_manager()
