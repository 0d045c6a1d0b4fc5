"""Who may do what on the bus: the ``authorization`` block of a nats-server serving one fleet.

Roles, from the ``nats_*`` settings of the controller (NATS authorization permissions):

* the controller's user (``nats_user`` / ``nats_password``, or the nkey of its
  ``nats_nkey_seed_file``) may do everything; operators' tools (``lmcache nats``) use it too;
* each instance in ``nats_instance_passwords`` (a user named after its instance id) or
  ``nats_instance_nkeys`` (a public nkey; the instance signs with its seed, no secret travels)
  publishes only its own events, heartbeats, registrations and goodbyes
  (``wire.worker_topics``) and replies to what it receives, and subscribes only to its own
  commands, the controller's hellos and its own inbox: it can neither command a worker, nor say
  hello to the fleet, nor speak for another instance;
* ``nats_token`` instead: one shared secret, no roles (every client may do everything).

Each user's request inbox is ``_INBOX.<user name or public nkey>`` (``inbox_prefix``, which the
bus uses when it connects with those settings), so an instance can neither read other clients'
replies nor forge them.

``python -m lmcache_transport_nats.auth_config --config controller.yaml`` prints the block as a
nats-server configuration file (JSON, which nats-server reads), for servers the controller does
not start; ``--new-nkey FILE`` makes an nkey seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmcache_core.errors import ConfigError
from lmcache_core.netaddr import is_loopback
from lmcache_core.wire import topic_token, worker_topics
from lmcache_transport_nats.settings import NatsSettings, nats_settings_from

DEFAULT_INBOX = "_INBOX"
#: the settings that make a bus server safe to expose, named in refusals
CREDENTIAL_KEYS = (
    "nats_user and nats_password, or nats_nkey_seed_file (the controller's bus user), with "
    "nats_instance_passwords or nats_instance_nkeys (one bus user per instance), or nats_token"
)


def prefixed(prefix: str, topic: str) -> str:
    """The NATS subject of a relative ``topic`` under ``prefix``."""
    return f"{prefix}.{topic}" if prefix else topic


def _owned_inbox(owner: str | None) -> str:
    return f"{DEFAULT_INBOX}.{topic_token(owner)}" if owner else DEFAULT_INBOX


def inbox_prefix(settings: Any) -> str:
    """The inbox a client with these settings receives its replies under: ``_INBOX.<user>``,
    ``_INBOX.<public nkey>`` for an nkey, plain ``_INBOX`` otherwise."""
    nats = nats_settings_from(settings)
    if nats.nats_user is not None:
        return _owned_inbox(nats.nats_user)
    if nats.nats_nkey_seed_file is not None:
        return _owned_inbox(nkey_public_key(nats.nats_nkey_seed_file))
    return DEFAULT_INBOX


def _nkeys() -> Any:
    try:
        import nkeys
    except ImportError as exc:  # a dependency, but installs without it exist
        raise ConfigError("NATS nkeys need the 'nkeys' package: pip install nkeys") from exc
    return nkeys


def nkey_public_key(seed_file: Path) -> str:
    """The public key ('U...') of the nkey seed in ``seed_file``; ``ConfigError`` naming the file."""
    try:
        seed = seed_file.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read nats_nkey_seed_file {seed_file}: {exc.strerror}") from None
    nkeys = _nkeys()
    try:
        public = nkeys.from_seed(seed).public_key.decode()
    except (nkeys.NkeysError, ValueError):
        raise ConfigError(f"nats_nkey_seed_file {seed_file} holds no valid nkey seed") from None
    if not public.startswith("U"):
        raise ConfigError(f"nats_nkey_seed_file {seed_file} holds a seed of another kind than a user's")
    return public


def new_nkey(seed_file: Path) -> str:
    """Write a fresh user nkey seed to ``seed_file`` (mode 0600, never overwritten); returns
    its public key."""
    nkeys = _nkeys()
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    try:
        with open(os.open(seed_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(seed + b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot write a new nkey seed to {seed_file}: {exc.strerror}") from None
    return str(nkeys.from_seed(seed).public_key.decode())


def instance_permissions(prefix: str, instance_id: str, inbox_owner: str) -> dict[str, Any]:
    """NATS permissions of the bus user of ``instance_id`` (every rank of it), whose replies
    come under ``_INBOX.<inbox_owner>`` (its user name or public nkey)."""
    topics = worker_topics(instance_id)
    inbox = f"{_owned_inbox(inbox_owner)}.>"
    return {
        "publish": {"allow": [*(prefixed(prefix, t) for t in topics.publish), inbox]},
        "subscribe": {"allow": [*(prefixed(prefix, t) for t in topics.subscribe), inbox]},
        "allow_responses": True,  # answering the controller's commands
    }


def _controller_user(nats: NatsSettings) -> dict[str, Any] | None:
    """The controller's own entry: user/password or the public key of its nkey seed."""
    if nats.nats_user is not None and nats.nats_nkey_seed_file is not None:
        raise ConfigError("set either nats_user or nats_nkey_seed_file for the controller, not both")
    if nats.nats_nkey_seed_file is not None:
        return {"nkey": nkey_public_key(nats.nats_nkey_seed_file)}
    if nats.nats_user is None:
        if nats.nats_password is not None:
            raise ConfigError("nats_password is set but nats_user is not")
        return None
    password = nats.nats_password.get_secret_value() if nats.nats_password is not None else ""
    if not password:
        raise ConfigError("nats_user needs a non-empty nats_password for the bus server")
    return {"user": nats.nats_user, "password": password}


def authorization(settings: Any) -> dict[str, Any] | None:
    """The ``authorization`` block of a server for this fleet; None when no credentials are set.

    ``ConfigError`` names the keys of a combination nats-server cannot serve.
    """
    nats = nats_settings_from(settings)
    passwords, nkeys_of = nats.nats_instance_passwords, nats.nats_instance_nkeys
    controller = _controller_user(nats)
    if controller is None:
        if passwords or nkeys_of:
            raise ConfigError(
                "nats_instance_passwords and nats_instance_nkeys need the controller's own bus "
                "user: nats_user and nats_password, or nats_nkey_seed_file"
            )
        return {"token": nats.nats_token.get_secret_value()} if nats.nats_token is not None else None
    if nats.nats_token is not None:
        raise ConfigError(
            "set either nats_token or the controller's bus user for the bus server, not both: "
            "nats-server takes one shared token or a list of users"
        )
    both = sorted(set(passwords) & set(nkeys_of))
    if both:
        raise ConfigError(f"instance {both[0]!r} is in both nats_instance_passwords and nats_instance_nkeys")
    if controller.get("user") in passwords:
        raise ConfigError(
            f"nats_user {controller['user']!r} is also an instance id in nats_instance_passwords: "
            "the controller's bus user needs a name of its own"
        )
    users: list[dict[str, Any]] = [controller]
    prefix = nats.nats_subject_prefix
    for instance_id, secret in sorted(passwords.items()):
        if not secret.get_secret_value():
            raise ConfigError(f"nats_instance_passwords[{instance_id!r}] is empty")
        users.append(
            {
                "user": instance_id,
                "password": secret.get_secret_value(),
                "permissions": instance_permissions(prefix, instance_id, instance_id),
            }
        )
    for instance_id, public in sorted(nkeys_of.items()):
        users.append({"nkey": public, "permissions": instance_permissions(prefix, instance_id, public)})
    return {"users": users}


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

