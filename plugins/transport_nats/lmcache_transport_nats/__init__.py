"""NATS transport for lmcache-core: a ``MessageBus`` on nats-py and a managed ``nats-server``."""

from lmcache_transport_nats.bus import NatsBus, NatsMessage, NatsSubscription, connect
from lmcache_transport_nats.server import (
    NatsCluster,
    NatsServerProcess,
    embedded_server,
    find_nats_server_binary,
    pid_alive,
)
from lmcache_transport_nats.settings import NatsSettings, nats_settings_from

__all__ = [
    "NatsBus",
    "NatsCluster",
    "NatsMessage",
    "NatsServerProcess",
    "NatsSettings",
    "NatsSubscription",
    "connect",
    "embedded_server",
    "find_nats_server_binary",
    "nats_settings_from",
    "pid_alive",
]
