"""The storage backend interface that backend plugins implement.

A backend stores chunks (one torch tensor each, any shape and dtype) under ``ChunkKey``s at
one location (``LocalCPUBackend``, ``LocalDiskBackend``, ...). Backends are thread-safe: the
engine calls them from vLLM's threads and their own background threads run beside.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from lmcache_core.codecs import ChunkEncoding
from lmcache_core.events import EventSink
from lmcache_core.keys import ChunkKey

if TYPE_CHECKING:
    from lmcache_core.config import LMCacheSettings


class ChunkView(AbstractContextManager["ChunkView"]):
    """Read access to one stored chunk without copying it.

    ``tensor`` stays valid (the backend neither evicts nor reuses its memory) until
    ``release()`` is called or the ``with`` block ends. Release exactly once.

    ``encoding`` is None for a chunk stored as it is; otherwise ``tensor`` is a codec's payload
    (1-D ``uint8``) and ``encoding`` says how to decode it. Views the engine hands out
    (``retrieve``, ``hold``) are always decoded.
    """

    def __init__(
        self,
        tensor: torch.Tensor,
        num_tokens: int,
        release: Callable[[], None] | None = None,
        encoding: ChunkEncoding | None = None,
    ) -> None:
        self.tensor = tensor
        self.num_tokens = num_tokens
        self.encoding = encoding
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __exit__(self, *exc: object) -> None:
        self.release()


class StorageBackend(abc.ABC):
    """One storage location. Every method is thread-safe.

    Every admit, evict and clear is announced through the ``EventSink`` the factory was given,
    in the order it happened, and only after it is visible (an admitted chunk can be read).
    """

    #: the location name this backend serves, e.g. ``"LocalCPUBackend"``
    location: str
    #: True when ``put`` returns before the data is stored (a background writer stores it)
    writes_behind: bool = False
    #: True when the backend keeps codec payloads with their ``ChunkEncoding`` (``put``'s
    #: ``encoding``, ``ChunkView.encoding``, ``replace``); the engine encodes only for these
    stores_encoded: bool = False

    @abc.abstractmethod
    def put(
        self,
        key: ChunkKey,
        data: torch.Tensor,
        num_tokens: int,
        on_done: Callable[[], None] | None = None,
    ) -> bool:
        """Store ``data`` (any shape and dtype) as ``key`` holding ``num_tokens`` tokens.

        A backend with ``writes_behind = False`` copies ``data`` before it returns and calls
        ``on_done`` (if given) before returning. A write-behind backend may read ``data`` until
        it calls ``on_done``; the caller keeps ``data`` unchanged until then. ``on_done`` is
        called exactly once, whether the write succeeds, fails or is dropped.

        Returns False when the chunk is not admitted (too large for the capacity, every
        resident chunk pinned, or a full write queue dropped it); storing a key that is
        already present is a no-op that returns True.

        Backends with ``stores_encoded`` also take ``encoding=``: ``data`` is then a codec's
        payload, kept with its encoding and handed back in ``ChunkView.encoding``.
        """

    @abc.abstractmethod
    def get(self, key: ChunkKey) -> ChunkView | None:
        """A view of the chunk, or None on a miss. Counts as a use for LRU."""

    @abc.abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Whether ``key`` is stored here (or queued to be). Does not count as a use."""

    @abc.abstractmethod
    def remove(self, key: ChunkKey) -> int:
        """Remove one chunk (pinned or not); returns the tokens removed (0 when absent)."""

    @abc.abstractmethod
    def clear(self) -> int:
        """Remove every chunk here, pinned ones included; returns the tokens removed."""

    @abc.abstractmethod
    def pin(self, key: ChunkKey) -> bool:
        """Protect a chunk from eviction (not from remove/clear); False when absent."""

    @abc.abstractmethod
    def unpin(self, key: ChunkKey) -> bool:
        """Undo ``pin``; False when absent or not pinned."""

    @abc.abstractmethod
    def inventory(self) -> list[tuple[ChunkKey, int]]:
        """Every stored chunk with its token count (for a worker's resync)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters for operators: chunks, tokens, bytes used, capacity bytes, evictions..."""

    def replace(
        self, key: ChunkKey, data: torch.Tensor, encoding: ChunkEncoding | None
    ) -> bool:
        """Store a stored chunk again in another form (a payload of ``encoding``, or raw when
        None), in place: same key and tokens, pins kept, no admit or evict announced for it.

        False when the chunk is absent (or not yet written) or the new form does not fit.
        Only backends with ``stores_encoded`` implement it.
        """
        raise NotImplementedError(f"{self.location} does not store encoded chunks")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are stored; True when nothing is left queued."""
        return True

    def close(self) -> None:
        """Stop background work and release resources; queued writes are completed first."""

    def __iter__(self) -> Iterator[ChunkKey]:
        return iter([key for key, _ in self.inventory()])


BackendFactory = Callable[["LMCacheSettings", EventSink], StorageBackend]


@dataclass(frozen=True)
class BackendSpec:
    """What a backend plugin registers through ``lmcache_storage_backends``.

    ``tier`` orders locations from fastest (lowest) to slowest; the engine looks chunks up in
    that order, writes behind into slower tiers and promotes hits into the fastest one.
    ``enabled`` tells from the settings whether an instance uses this location.
    """

    location: str
    factory: BackendFactory
    tier: int
    enabled: Callable[["LMCacheSettings"], bool] = lambda settings: True
    settings_model: type[BaseModel] | None = None
    description: str = ""
    plugin: str = field(default="", compare=False)  # filled by the plugin manager
