"""The message bus between workers and the controller, which transport plugins implement.

The core speaks a small protocol (``lmcache_core.wire``) over topics; a transport only moves
bytes: publish, subscribe and request/reply, with NATS-style topics (dot-separated tokens,
``*`` matches one token, ``>`` the rest). Topics given to the bus are relative; the transport
puts its own prefix in front (so several fleets can share one server).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from lmcache_core.config import LMCacheSettings


class Message(abc.ABC):
    """One received message."""

    topic: str  # relative to the bus prefix
    payload: bytes

    @abc.abstractmethod
    async def respond(self, payload: bytes) -> None:
        """Answer a request; an error when the message was not a request."""


Handler = Callable[[Message], Awaitable[None]]


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def unsubscribe(self) -> None: ...

    def pending(self) -> int:
        """Messages received for this subscription and not yet given to its handler (0 when the
        transport cannot tell). With ``flush()`` first it tells a backlog from a loss."""
        return 0


class MessageBus(abc.ABC):
    """A connected client of the transport. Use as an async context manager or call aclose()."""

    @abc.abstractmethod
    async def publish(self, topic: str, payload: bytes) -> None:
        """Send without waiting for anyone; buffered while disconnected where the transport can."""

    @abc.abstractmethod
    async def request(self, topic: str, payload: bytes, timeout: float) -> bytes:
        """Send and wait for one reply.

        Raises ``RequestTimeout`` when no reply comes within ``timeout`` seconds and
        ``NoResponders`` when nobody listens on ``topic``.
        """

    @abc.abstractmethod
    async def subscribe(self, topic: str, handler: Handler) -> Subscription:
        """Call ``handler`` for every message on ``topic`` (wildcards allowed), in order."""

    @abc.abstractmethod
    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far has reached the server."""

    @abc.abstractmethod
    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Register a coroutine run after each reconnection (workers resync there)."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> "MessageBus":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(frozen=True)
class TransportSpec:
    """What a transport plugin registers through ``lmcache_transports``.

    ``connect(settings, url)`` opens a bus to ``url`` (``None``: the URL its settings name).
    ``embedded_server(settings, host, port)``, when given, is an async context manager that runs
    a server of this transport for the controller's ``--monitor-port`` (with the credentials and
    roles its settings name; ``ConfigError`` when it would be open to the network) and stops it
    on exit.
    """

    name: str
    connect: Callable[["LMCacheSettings", str | None], Awaitable[MessageBus]]
    embedded_server: Callable[["LMCacheSettings", str, int], AbstractAsyncContextManager[str]] | None = None
    settings_model: type[BaseModel] | None = None
    description: str = ""
    plugin: str = field(default="", compare=False)
