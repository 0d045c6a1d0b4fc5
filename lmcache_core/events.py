"""Admit/evict announcements from storage backends, delivered in order to subscribers.

A backend calls ``EventSink.admitted`` / ``evicted`` / ``cleared`` the moment its contents
change; the ``EventBus`` numbers every event per location and hands it to each subscriber
synchronously, under one lock, so subscribers see the exact order of changes. Subscribers must
be quick (append to a queue); the controller worker batches and publishes them.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import NamedTuple

from lmcache_core.keys import ChunkKey


class EventKind(enum.IntEnum):
    """What happened at a location. The integer values are part of the wire format."""

    ADMIT = 1
    EVICT = 2
    CLEAR = 3  # the whole location was emptied; ``key`` is None, ``num_tokens`` the total removed


class KVEvent(NamedTuple):
    """One change at one location, numbered by ``seq`` (1, 2, 3 ... per location).

    A named tuple rather than a frozen dataclass: it is built for every admit and evict, and
    a frozen dataclass costs several times more to construct.
    """

    kind: EventKind
    location: str
    key: ChunkKey | None
    num_tokens: int
    seq: int


Subscriber = Callable[[KVEvent], None]
_ADMIT, _EVICT = EventKind.ADMIT, EventKind.EVICT  # looked up once: enum attributes are slow


class EventBus:
    """Numbers events per location and fans them out to subscribers in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._seq: dict[str, int] = {}

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, kind: EventKind, location: str, key: ChunkKey | None, num_tokens: int) -> None:
        with self._lock:
            seq = self._seq[location] = self._seq.get(location, 0) + 1
            event = KVEvent(kind, location, key, num_tokens, seq)
            for callback in self._subscribers:
                callback(event)

    def sink(self, location: str, accept: Callable[[ChunkKey], bool] | None = None) -> "EventSink":
        """The announcer a backend at ``location`` uses.

        With ``accept``, admits and evicts of keys it refuses are not announced (an engine
        announces only chunks of its own model shard, whatever a shared directory holds).
        """
        return EventSink(self, location, accept)


class EventSink:
    """What one backend uses to announce changes at its own location."""

    __slots__ = ("_bus", "location", "_accept")

    def __init__(
        self, bus: EventBus, location: str, accept: Callable[[ChunkKey], bool] | None = None
    ) -> None:
        self._bus = bus
        self.location = location
        self._accept = accept

    def admitted(self, key: ChunkKey, num_tokens: int) -> None:
        if self._accept is None or self._accept(key):
            self._bus.emit(_ADMIT, self.location, key, num_tokens)

    def evicted(self, key: ChunkKey, num_tokens: int) -> None:
        if self._accept is None or self._accept(key):
            self._bus.emit(_EVICT, self.location, key, num_tokens)

    def cleared(self, num_tokens: int) -> None:
        self._bus.emit(EventKind.CLEAR, self.location, None, num_tokens)
