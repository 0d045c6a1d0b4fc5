"""A test-only outside plugin: registers a third location, ``TestDictBackend``.

It is found through a real ``lmcache`` entry point (the tests write its dist-info), exactly as
a third party's pip-installed plugin would be. ``THIRDLOC_CLAIM`` (comma-separated) makes it
claim other location names too, to provoke conflicts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
from pydantic import BaseModel, Field

from lmcache_core import hookimpl
from lmcache_core.events import EventSink
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import BackendSpec, ChunkView, StorageBackend


class ThirdLocSettings(BaseModel):
    thirdloc_enabled: bool = Field(True, description="Whether instances use TestDictBackend.")


class DictBackend(StorageBackend):
    """Keeps chunk copies in a dict; no capacity. Enough to exercise the engine and plugins."""

    def __init__(self, location: str, events: EventSink) -> None:
        self.location = location
        self._events = events
        self._lock = threading.Lock()
        self._chunks: dict[ChunkKey, tuple[torch.Tensor, int]] = {}
        self._pinned: set[ChunkKey] = set()

    def put(self, key: ChunkKey, data: torch.Tensor, num_tokens: int,
            on_done: Callable[[], None] | None = None) -> bool:
        with self._lock:
            if key not in self._chunks:
                self._chunks[key] = (data.clone(), num_tokens)
                self._events.admitted(key, num_tokens)
        if on_done is not None:
            on_done()
        return True

    def get(self, key: ChunkKey) -> ChunkView | None:
        with self._lock:
            entry = self._chunks.get(key)
        return None if entry is None else ChunkView(entry[0], entry[1])

    def contains(self, key: ChunkKey) -> bool:
        return key in self._chunks

    def remove(self, key: ChunkKey) -> int:
        with self._lock:
            entry = self._chunks.pop(key, None)
            self._pinned.discard(key)
            if entry is None:
                return 0
            self._events.evicted(key, entry[1])
            return entry[1]

    def clear(self) -> int:
        with self._lock:
            total = sum(n for _, n in self._chunks.values())
            self._chunks.clear()
            self._pinned.clear()
            self._events.cleared(total)
            return total

    def pin(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._chunks:
                return False
            self._pinned.add(key)
            return True

    def unpin(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._pinned:
                return False
            self._pinned.discard(key)
            return True

    def inventory(self) -> list[tuple[ChunkKey, int]]:
        with self._lock:
            return [(key, n) for key, (_, n) in self._chunks.items()]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"chunks": len(self._chunks), "pinned": len(self._pinned)}


def _factory(location: str):
    return lambda settings, events: DictBackend(location, events)


@hookimpl
def lmcache_storage_backends() -> list[BackendSpec]:
    names = ["TestDictBackend"] + [
        n for n in os.environ.get("THIRDLOC_CLAIM", "").split(",") if n
    ]
    return [
        BackendSpec(
            name,
            factory=_factory(name),
            tier=5,
            enabled=lambda settings: getattr(settings, "thirdloc_enabled", True),
            description="test-only dict backend",
        )
        for name in names
    ]


@hookimpl
def lmcache_settings_models() -> list[type[BaseModel]]:
    return [ThirdLocSettings]
