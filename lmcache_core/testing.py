"""Reusable pytest fixtures for lmcache-core and its plugins (a pytest plugin, ``-p lmcache``).

Installed with lmcache-core through the ``pytest11`` entry point, so outside plugin authors get
the same fixtures: a fresh plugin manager, settings bound to a temporary directory, and (with
the NATS transport installed) a real ``nats-server`` on a free port.

``running_nats_server()`` is the same server as a plain context manager, for benchmarks and
examples outside pytest.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pluggy
import pytest

from lmcache_core.errors import PluginError

if TYPE_CHECKING:
    from lmcache_transport_nats.server import NatsServerProcess


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


def _nats_server_class() -> type["NatsServerProcess"]:
    try:
        from lmcache_transport_nats.server import NatsServerProcess
    except ImportError as exc:
        raise PluginError(
            "a NATS server needs the NATS transport plugin: "
            "pip install lmcache-transport-nats (in this repository: pip install -e plugins/transport_nats)"
        ) from exc
    return NatsServerProcess


@contextlib.contextmanager
def running_nats_server(
    host: str = "127.0.0.1", port: int | None = None, **options: Any
) -> Iterator["NatsServerProcess"]:
    """A real ``nats-server`` on ``host:port`` (a free port when None) for the block.

    Yields the server: ``.url``, ``.port``, ``.pid``, ``.stop()`` and ``.start()`` (which
    restarts it on the same port, for reconnect tests). ``options`` go to
    ``NatsServerProcess`` (``authorization``, ``user``/``password``, ``token``, ``args``).
    Needs the NATS transport plugin; without it ``PluginError`` says what to install.
    """
    server = _nats_server_class()(host, port, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server() -> Iterator["NatsServerProcess"]:
    """A real ``nats-server`` on a free loopback port, stopped after the test."""
    try:
        _nats_server_class()
    except PluginError as exc:
        pytest.fail(str(exc), pytrace=False)  # a missing plugin is a broken setup, not a skip
    with running_nats_server() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: "NatsServerProcess") -> str:
    """``nats://127.0.0.1:<port>`` of the test's ``nats_server``."""
    return nats_server.url
