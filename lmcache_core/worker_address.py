"""Where a worker says it is: LMCache's ``ip`` and ``port`` of a worker (its ``peer_init_url``
is where its peer channel serves, ``lmcache_core.p2p``, when ``enable_p2p`` is on).

Workers talk to the controller over the message bus and listen on no port of their own, but
LMCache's API reports these fields (``/query_worker_info``, ``/controller/workers``) and finds an
instance by its ``ip`` (``/query_instance``), so a worker registers them:

* ``ip``: the source address of this host's route to the bus's first server (found by
  connecting a UDP socket, which sends nothing), so a router that sees an instance's serving
  address can find it; "" when no route is found;
* ``port``: this rank's LMCache ``lmcache_worker_port`` / ``lmcache_worker_ports`` when the
  settings give one (nothing listens there), else 0.
"""

from __future__ import annotations

import socket
from typing import Any, NamedTuple
from urllib.parse import urlsplit

#: the port assumed when the bus URL names none (NATS' default)
_DEFAULT_BUS_PORT = 4222


class WorkerAddress(NamedTuple):
    """What a registration says about where a worker is."""

    ip: str
    port: int


def _for_rank(value: int | list[int] | None, rank: int) -> int | None:
    """LMCache's per-rank port settings: one port for every rank, or a list indexed by rank."""
    if isinstance(value, list):
        return value[rank] if rank < len(value) else None
    return value


def route_source_ip(bus_url: str | None) -> str:
    """The local address this host would reach the bus's first server from ("" when none)."""
    first = (bus_url or "localhost").split(",")[0].strip()
    parsed = urlsplit(first if "://" in first else f"nats://{first}")
    host = parsed.hostname or "localhost"
    try:
        port = parsed.port or _DEFAULT_BUS_PORT
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # picks the route; a UDP connect sends no packet
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return ""


def worker_address(settings: Any, rank: int) -> WorkerAddress:
    """The address fields of rank ``rank`` from the settings (see the module's doc)."""
    port = settings.lmcache_worker_port
    if port is None:
        port = _for_rank(settings.lmcache_worker_ports, rank)
    port = port if port is not None and 0 <= port <= 65535 else 0
    return WorkerAddress(route_source_ip(settings.controller_address), port)
