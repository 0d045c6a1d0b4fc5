"""Who may do what on the bus: the ``authorization`` block of a nats-server serving one fleet.

Roles, from the ``nats_*`` settings of the controller (NATS authorization permissions):

* the controller's user (``nats_user`` / ``nats_password``) may do everything; operators'
  tools (``lmcache nats``) use it too;
* each instance in ``nats_instance_passwords`` gets a user named after its instance id that
  publishes only its own events, heartbeats and registrations (``wire.worker_topics``) and
  replies to what it receives, and subscribes only to its own commands, the controller's hello
  and its own inbox: it can neither command a worker, nor say hello, nor speak for another
  instance;
* ``nats_token`` instead: one shared secret, no roles (every client may do everything).

Each user's request inbox is ``_INBOX.<user>`` (``inbox_prefix``, which the bus uses when it
connects as that user), so an instance can neither read other clients' replies nor forge them.

``python -m lmcache_transport_nats.auth_config --config controller.yaml`` prints the block as a
nats-server configuration file (JSON, which nats-server reads), for servers the controller does
not start.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from lmcache_core.errors import ConfigError
from lmcache_core.wire import topic_token, worker_topics
from lmcache_transport_nats.settings import nats_settings_from

DEFAULT_INBOX = "_INBOX"
#: the settings that make a bus server safe to expose, named in refusals
CREDENTIAL_KEYS = "nats_user and nats_password (the controller's bus user) with nats_instance_passwords (one bus user per instance), or nats_token"


def prefixed(prefix: str, topic: str) -> str:
    """The NATS subject of a relative ``topic`` under ``prefix``."""
    return f"{prefix}.{topic}" if prefix else topic


def inbox_prefix(user: str | None) -> str:
    """The inbox a client connecting as ``user`` receives its replies under."""
    return f"{DEFAULT_INBOX}.{topic_token(user)}" if user else DEFAULT_INBOX


def instance_permissions(prefix: str, instance_id: str) -> dict[str, Any]:
    """NATS permissions of the bus user of ``instance_id`` (every rank of it)."""
    topics = worker_topics(instance_id)
    inbox = f"{inbox_prefix(instance_id)}.>"
    return {
        "publish": {"allow": [*(prefixed(prefix, t) for t in topics.publish), inbox]},
        "subscribe": {"allow": [*(prefixed(prefix, t) for t in topics.subscribe), inbox]},
        "allow_responses": True,  # answering the controller's commands
    }


def authorization(settings: Any) -> dict[str, Any] | None:
    """The ``authorization`` block of a server for this fleet; None when no credentials are set.

    ``ConfigError`` names the keys of a combination nats-server cannot serve.
    """
    nats = nats_settings_from(settings)
    instances = nats.nats_instance_passwords
    if nats.nats_user is None:
        if instances or nats.nats_password is not None:
            raise ConfigError(
                "nats_instance_passwords and nats_password need nats_user: the controller's own bus user"
            )
        return {"token": nats.nats_token.get_secret_value()} if nats.nats_token is not None else None
    if nats.nats_token is not None:
        raise ConfigError(
            "set either nats_token or nats_user for the bus server, not both: nats-server takes "
            "one shared token or a list of users"
        )
    password = nats.nats_password.get_secret_value() if nats.nats_password is not None else ""
    if not password:
        raise ConfigError("nats_user needs a non-empty nats_password for the bus server")
    if nats.nats_user in instances:
        raise ConfigError(
            f"nats_user {nats.nats_user!r} is also an instance id in nats_instance_passwords: "
            "the controller's bus user needs a name of its own"
        )
    users: list[dict[str, Any]] = [{"user": nats.nats_user, "password": password}]
    for instance_id, secret in sorted(instances.items()):
        if not secret.get_secret_value():
            raise ConfigError(f"nats_instance_passwords[{instance_id!r}] is empty")
        users.append(
            {
                "user": instance_id,
                "password": secret.get_secret_value(),
                "permissions": instance_permissions(nats.nats_subject_prefix, instance_id),
            }
        )
    return {"users": users}


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_exposure(settings: Any, host: str) -> dict[str, Any] | None:
    """The server's ``authorization`` block; ``ConfigError`` when it would be open on a
    non-loopback ``host`` (anyone reaching it could command every worker)."""
    block = authorization(settings)
    if block is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to run the embedded NATS server on {host!r} (not loopback) without "
            f"credentials: set {CREDENTIAL_KEYS}"
        )
    return block

