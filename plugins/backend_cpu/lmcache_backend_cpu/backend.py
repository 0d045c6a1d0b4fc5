"""``LocalCPUBackend``: chunks kept in one preallocated CPU memory pool, evicted LRU-first.

Layout: one ``uint8`` tensor of ``capacity`` bytes (page-locked when CUDA is present, so copies
to and from the GPU can run at full speed). Each chunk owns one aligned byte range of it and is
read back as a view of its original dtype and shape, so ``get`` never copies.

Life of a chunk's range:

* ``put`` reserves a range under the lock (evicting LRU chunks if needed), copies the data in
  *outside* the lock, then publishes the chunk and announces it, under the lock again;
* the chunk is evictable while it sits in the LRU list, that is while it is neither pinned nor
  viewed (``get`` takes it out until the view is released, then puts it back as most recent);
* ``remove``/``clear`` drop a viewed chunk at once but free its range only when the last view
  is released, so nobody's view is ever overwritten.

Events are sent under the backend's lock, right after the change they describe, so they reach
subscribers in the order the changes happened. Subscribers therefore must not call back into
the backend from their callback (queue the event and act on it elsewhere).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lmcache_core.codecs import ChunkEncoding
from lmcache_core.errors import BackendError
from lmcache_core.events import EventSink
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import ChunkView, StorageBackend

from lmcache_backend_cpu.allocator import PoolAllocator, align_up

if TYPE_CHECKING:
    from lmcache_core.config import LMCacheSettings

LOCATION = "LocalCPUBackend"


class _Slot:
    """One chunk's range of the pool and its state (guarded by the backend's lock)."""

    __slots__ = (
        "key", "offset", "size", "nbytes", "num_tokens", "tensor", "holds", "pinned", "live", "encoding"
    )

    def __init__(
        self,
        key: ChunkKey,
        offset: int,
        size: int,
        nbytes: int,
        num_tokens: int,
        encoding: ChunkEncoding | None = None,
    ) -> None:
        self.key = key
        self.offset = offset
        self.size = size  # bytes reserved in the pool (aligned)
        self.nbytes = nbytes  # bytes of the chunk itself
        self.num_tokens = num_tokens
        self.tensor: torch.Tensor | None = None  # the chunk as its dtype/shape, once copied in
        self.holds = 0  # outstanding ChunkViews
        self.pinned = False
        self.live = True  # False once removed; the range is freed when ``holds`` drops to 0
        self.encoding = encoding  # how ``tensor`` is encoded (None: the chunk as it is)


class LocalCPUBackend(StorageBackend):
    """Stores chunks in a fixed-size CPU memory pool, evicting least recently used ones.

    ``capacity_bytes`` bounds the pool; chunks are kept as byte ranges of it, so the bytes
    of stored chunks never exceed it. Thread-safe (one lock; data copies run outside it).
    """

    location = LOCATION
    writes_behind = False
    stores_encoded = True

    def __init__(
        self, capacity_bytes: int, sink: EventSink, *, pin_memory: bool | None = None
    ) -> None:
        if capacity_bytes < 0:
            raise BackendError(f"{LOCATION}: capacity must be >= 0 bytes, got {capacity_bytes}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        try:
            # torch.empty leaves pages untouched, so an unused capacity costs no memory
            # (page-locked memory, by contrast, is committed at once)
            self._pool = torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        except RuntimeError as exc:
            raise BackendError(
                f"{LOCATION}: cannot allocate a {capacity_bytes}-byte pool "
                f"(pin_memory={pin_memory}): {exc}"
            ) from exc
        self.capacity_bytes = capacity_bytes
        self.pinned_pool = pin_memory
        self._sink = sink
        self._lock = threading.Lock()
        self._alloc = PoolAllocator(capacity_bytes)
        self._chunks: dict[ChunkKey, _Slot] = {}  # published chunks
        self._pending: dict[ChunkKey, _Slot] = {}  # ranges reserved by puts still copying
        self._lru: OrderedDict[ChunkKey, _Slot] = OrderedDict()  # evictable only, oldest first
        # slots that eviction cannot free (pinned, viewed, being written, removed-but-viewed):
        # they bound the runs that evicting could ever produce
        self._fixed: set[_Slot] = set()
        self._used_bytes = 0  # bytes of every reserved range's chunk, pending and zombies too
        self._tokens = 0
        self._closed = False
        self._evictions = 0
        self._rejected = 0
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_settings(cls, settings: "LMCacheSettings", sink: EventSink) -> "LocalCPUBackend":
        """The factory registered in the ``BackendSpec``: capacity from ``max_local_cpu_size``."""
        return cls(settings.max_local_cpu_bytes, sink)

    # ---- StorageBackend --------------------------------------------------------------------

    def put(
        self,
        key: ChunkKey,
        data: torch.Tensor,
        num_tokens: int,
        on_done: Callable[[], None] | None = None,
        encoding: ChunkEncoding | None = None,
    ) -> bool:
        """Copy ``data`` into the pool as ``key``; False when it cannot fit (nothing changes then).

        With ``encoding``, ``data`` is a codec's payload: its bytes are what the pool holds and
        what counts against the capacity.
        """
        try:
            return self._put(key, data, num_tokens, encoding)
        finally:
            if on_done is not None:
                on_done()

    def get(self, key: ChunkKey) -> ChunkView | None:
        """A zero-copy view of the chunk; its range stays untouched until the view is released."""
        with self._lock:
            self._check_open()
            slot = self._chunks.get(key)
            if slot is None:
                self._misses += 1
                return None
            self._hits += 1
            self._hold(slot)
            tensor = slot.tensor
        assert tensor is not None  # published slots always carry their tensor
        return ChunkView(
            tensor, slot.num_tokens, release=lambda: self._release(slot), encoding=slot.encoding
        )

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._chunks or key in self._pending

    def remove(self, key: ChunkKey) -> int:
        with self._lock:
            self._check_open()
            slot = self._chunks.get(key)
            if slot is None:
                return 0
            self._drop(slot)
            self._sink.evicted(key, slot.num_tokens)
            return slot.num_tokens

    def clear(self) -> int:
        """Remove every published chunk (pinned ones too) and announce one CLEAR event."""
        with self._lock:
            self._check_open()
            removed = self._tokens
            for slot in list(self._chunks.values()):
                self._drop(slot)
            self._sink.cleared(removed)
            return removed

    def pin(self, key: ChunkKey) -> bool:
        with self._lock:
            slot = self._chunks.get(key)
            if slot is None:
                return False
            if not slot.pinned and slot.holds == 0:
                del self._lru[key]
                self._fixed.add(slot)
            slot.pinned = True
            return True

    def unpin(self, key: ChunkKey) -> bool:
        """Make a pinned chunk evictable again (as the most recently used, unless viewed)."""
        with self._lock:
            slot = self._chunks.get(key)
            if slot is None or not slot.pinned:
                return False
            slot.pinned = False
            if slot.holds == 0:
                self._make_evictable(slot)
            return True

    def inventory(self) -> list[tuple[ChunkKey, int]]:
        with self._lock:
            return [(key, slot.num_tokens) for key, slot in self._chunks.items()]

    def stats(self) -> dict[str, Any]:
        """Counters; ``used_bytes`` includes chunks being written and removed-but-viewed ones."""
        with self._lock:
            return {
                "location": LOCATION,
                "chunks": len(self._chunks),
                "tokens": self._tokens,
                "used_bytes": self._used_bytes,
                "capacity_bytes": self.capacity_bytes,
                "free_bytes": self._alloc.free_bytes,
                "largest_free_bytes": self._alloc.largest_free(),
                "pinned": sum(1 for slot in self._chunks.values() if slot.pinned),
                "views": sum(slot.holds for slot in self._fixed),
                "evictions": self._evictions,
                "rejected": self._rejected,
                "hits": self._hits,
                "misses": self._misses,
                "pinned_pool": self.pinned_pool,
            }

    def close(self) -> None:
        """Forget every chunk and let go of the pool (views still out keep their memory alive)."""
        with self._lock:
            self._closed = True
            self._chunks.clear()
            self._pending.clear()
            self._lru.clear()
            self._fixed.clear()
            self._pool = torch.empty(0, dtype=torch.uint8)

    # ---- internals -------------------------------------------------------------------------

    def _put(
        self, key: ChunkKey, data: torch.Tensor, num_tokens: int, encoding: ChunkEncoding | None
    ) -> bool:
        nbytes = data.numel() * data.element_size()
        with self._lock:
            self._check_open()
            if key in self._chunks or key in self._pending:
                return True
            slot = self._reserve(key, nbytes, num_tokens)
            if slot is None:
                self._rejected += 1
                return False
            pool = self._pool
        view = self._copy_in(pool, slot, data, encoding)
        with self._lock:
            if self._closed:
                return False
            del self._pending[key]
            slot.tensor = view
            self._fixed.remove(slot)
            self._chunks[key] = slot
            self._lru[key] = slot
            self._tokens += num_tokens
            self._sink.admitted(key, num_tokens)
        return True

    def _copy_in(
        self, pool: torch.Tensor, slot: _Slot, data: torch.Tensor, encoding: ChunkEncoding | None
    ) -> torch.Tensor:
        """Copy ``data`` into a reserved range (outside the lock); the range's typed view."""
        try:
            view = pool[slot.offset : slot.offset + slot.nbytes].view(data.dtype).view(data.shape)
            # the one copy of a store; copy_ reads any strides, so no .contiguous() clone first
            with torch.no_grad():
                view.copy_(data)
        except Exception as exc:  # any failure must give the reserved range back
            with self._lock:
                self._unreserve(slot)
            raise BackendError(
                f"{LOCATION}: cannot store {slot.key.to_string()} "
                f"({data.dtype}, shape {tuple(data.shape)}): {exc}"
            ) from exc
        slot.encoding = encoding
        return view

    def replace(
        self, key: ChunkKey, data: torch.Tensor, encoding: ChunkEncoding | None
    ) -> bool:
        """Store a chunk again in another form (see ``StorageBackend.replace``).

        The new form gets its own range (evicting others if needed); the old range is freed
        once no view reads it any more. The chunk becomes the most recently used one.
        """
        nbytes = data.numel() * data.element_size()
        with self._lock:
            self._check_open()
            old = self._chunks.get(key)
            if old is None or key in self._pending:
                return False
            self._hold(old)  # so that making room for the new form never evicts the old one
            slot = self._reserve(key, nbytes, old.num_tokens)
            if slot is None:
                self._release_locked(old)
                return False
            pool = self._pool
        try:
            view = self._copy_in(pool, slot, data, encoding)
        except BaseException:
            with self._lock:
                self._release_locked(old)
            raise
        with self._lock:
            if self._closed:
                return False
            del self._pending[key]
            if self._chunks.get(key) is not old:  # removed or cleared meanwhile
                self._fixed.remove(slot)
                self._free(slot)
                self._release_locked(old)
                return False
            slot.tensor = view
            slot.pinned = old.pinned
            self._chunks[key] = slot
            if not slot.pinned:
                self._make_evictable(slot)
            old.live = False
            old.pinned = False
            self._release_locked(old)
        return True

    def _reserve(self, key: ChunkKey, nbytes: int, num_tokens: int) -> _Slot | None:
        """Find room for ``nbytes`` (evicting if needed) and reserve it for ``key``. Locked."""
        if nbytes > self.capacity_bytes:
            return None
        if nbytes == 0:
            offset, size = 0, 0  # an empty chunk needs no room
        else:
            if not self._alloc.fits(nbytes):
                if not self._eviction_could_fit(nbytes):
                    return None  # refuse before evicting anything, so nothing is disturbed
                while not self._alloc.fits(nbytes):
                    _, victim = self._lru.popitem(last=False)
                    self._evict(victim)
            found = self._alloc.allocate(nbytes)
            assert found is not None  # fits() said so
            offset, size = found
        slot = _Slot(key, offset, size, nbytes, num_tokens)
        self._pending[key] = slot
        self._fixed.add(slot)
        self._used_bytes += nbytes
        return slot

    def _eviction_could_fit(self, nbytes: int) -> bool:
        """Whether evicting every evictable chunk would open a run of ``nbytes``. Locked.

        Every reserved range is either evictable (in the LRU list) or fixed, so the runs that
        eviction can produce are exactly the gaps between fixed ranges; usually there are few.
        """
        cursor = 0
        for start, end in sorted((s.offset, s.offset + s.size) for s in self._fixed):
            if _run_fits(cursor, start, nbytes, self.capacity_bytes):
                return True
            cursor = max(cursor, end)
        return _run_fits(cursor, self.capacity_bytes, nbytes, self.capacity_bytes)

    def _evict(self, slot: _Slot) -> None:
        """Free an LRU victim (already taken off the LRU list) and announce it. Locked."""
        del self._chunks[slot.key]
        self._tokens -= slot.num_tokens
        self._free(slot)
        self._evictions += 1
        self._sink.evicted(slot.key, slot.num_tokens)

    def _drop(self, slot: _Slot) -> None:
        """Unpublish a chunk; free its range now, or when its last view is released. Locked."""
        del self._chunks[slot.key]
        self._tokens -= slot.num_tokens
        slot.live = False
        slot.pinned = False
        if slot.holds == 0:
            if self._lru.pop(slot.key, None) is None:
                self._fixed.remove(slot)  # it was pinned
            self._free(slot)

    def _hold(self, slot: _Slot) -> None:
        """One more reader of ``slot``: it leaves the LRU list until the last one is done. Locked."""
        if slot.holds == 0 and not slot.pinned:
            del self._lru[slot.key]
            self._fixed.add(slot)
        slot.holds += 1

    def _release(self, slot: _Slot) -> None:
        """A view of ``slot`` is done with."""
        with self._lock:
            self._release_locked(slot)

    def _release_locked(self, slot: _Slot) -> None:
        slot.holds -= 1
        if slot.holds or self._closed:
            return
        if not slot.live:
            self._fixed.remove(slot)
            self._free(slot)
        elif not slot.pinned:
            self._make_evictable(slot)

    def _make_evictable(self, slot: _Slot) -> None:
        self._fixed.remove(slot)
        self._lru[slot.key] = slot

    def _unreserve(self, slot: _Slot) -> None:
        """Undo ``_reserve`` after a failed copy. Locked."""
        self._pending.pop(slot.key, None)
        self._fixed.discard(slot)
        self._free(slot)

    def _free(self, slot: _Slot) -> None:
        self._alloc.free(slot.offset, slot.size)
        self._used_bytes -= slot.nbytes

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{LOCATION} is closed")


def _run_fits(start: int, end: int, nbytes: int, capacity: int) -> bool:
    """Whether an allocation of ``nbytes`` fits in the run ``[start, end)`` of a pool."""
    need = nbytes if end == capacity else align_up(nbytes)
    return end - start >= need
