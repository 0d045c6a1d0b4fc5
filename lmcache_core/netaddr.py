"""Network addresses: whether a listening address is reachable only from this machine.

Everything lmcache-core starts listens on loopback unless it is protected: the controller's HTTP
API needs an API token elsewhere, the embedded bus server needs credentials elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (unresolvable: False)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
