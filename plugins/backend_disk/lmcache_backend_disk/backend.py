"""LocalDiskBackend: one checksummed file per chunk, written behind by a background thread.

Life of a chunk: ``put`` queues it (the caller's tensor is read later, so the caller keeps it
unchanged until ``on_done``); the writer thread makes room (LRU eviction), writes a temporary
file, fsyncs it, renames it into place, fsyncs the directory and only then indexes the chunk
and announces it as admitted. Until then ``get`` serves the queued tensor itself, so a chunk
never disappears between being put and being written.

Crash safety comes from the rename: a file with the final name is always complete; temporary
files are deleted at startup; every header and every data read is checksummed, and a file that
fails a check is removed and counted instead of being served.

Several backends (vLLM instances on one machine) may share one ``local_disk`` directory: each
writes into its own write area, a subdirectory it holds a lock on, and reads the others' areas
on a miss (see areas.py). Everything above applies to the own area only.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from lmcache_core.codecs import ChunkEncoding
from lmcache_core.errors import BackendError
from lmcache_core.events import EventSink
from lmcache_core.keys import ChunkKey
from lmcache_core.storage import ChunkView, StorageBackend

from lmcache_backend_disk.areas import (
    DEFAULT_INSTANCE_ID,
    SharedAreas,
    WriteArea,
    adopt_root_files,
    claim_write_area,
)
from lmcache_backend_disk.chunkfile import (
    CHUNK_SUFFIX,
    TEMP_SUFFIX,
    CorruptChunkError,
    encode_header,
    file_name,
    read_chunk,
    read_header,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

LOCATION = "LocalDiskBackend"
QueueFullPolicy = Literal["block", "drop"]
Callback = Callable[[], None]


@dataclass(eq=False, slots=True)
class _Entry:
    """A chunk file on disk."""

    num_tokens: int
    size: int
    path: Path
    pins: int = 0


@dataclass(eq=False, slots=True)
class _Pending:
    """A chunk put but not yet written. ``on_done`` fires once it has left the pipeline
    (written, failed, dropped or cancelled) and no reader still holds its tensor."""

    key: ChunkKey
    data: torch.Tensor
    num_tokens: int
    size: int
    on_done: Callback | None
    encoding: ChunkEncoding | None = None
    pins: int = 0
    queued: bool = True
    cancelled: bool = False
    settled: bool = False
    readers: int = 0


def _call(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a caller's callback must not kill the writer thread
            logger.exception("an on_done callback of LocalDiskBackend raised")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _touch(fd: int) -> None:
    """Stamp the file's mtime with the exact time: it records the LRU order across restarts
    (the kernel's own timestamps are only as fine as a clock tick, too coarse to order by)."""
    now = time.time_ns()
    try:
        os.utime(fd, ns=(now, now))
    except OSError:
        pass  # a read-only directory still serves its chunks; only the LRU hint is lost


def _file_size(
    key: ChunkKey, data: torch.Tensor, num_tokens: int, encoding: ChunkEncoding | None
) -> int:
    """Bytes of the chunk file ``data`` makes: its header plus its data."""
    header = encode_header(key, data.dtype, tuple(data.shape), num_tokens, 0, 0, encoding)
    return len(header) + data.numel() * data.element_size()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("LocalDiskBackend cannot delete %s: %s", path, exc)


class LocalDiskBackend(StorageBackend):
    """Chunks as files in a write area of ``directory``, with a bounded write-behind queue and
    LRU capacity; chunks in the directory's other areas are read on a miss.

    The write area is ``directory/<instance_id made file-name safe>`` (``.1``, ``.2``... when
    a live backend holds it); ``self.area`` names the one taken. ``capacity_bytes=None`` sizes
    the capacity at startup as ``auto_capacity_fraction`` of the filesystem's free space plus
    what the area's chunk files already use.
    """

    location = LOCATION
    writes_behind = True
    stores_encoded = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        event_sink: EventSink,
        *,
        capacity_bytes: int | None,
        write_queue_size: int = 64,
        queue_full_policy: QueueFullPolicy = "block",
        fsync: bool = True,
        auto_capacity_fraction: float = 0.5,
        instance_id: str = DEFAULT_INSTANCE_ID,
    ) -> None:
        if write_queue_size < 1:
            raise BackendError(f"disk_write_queue_size must be at least 1, got {write_queue_size}")
        if queue_full_policy not in ("block", "drop"):
            raise BackendError(
                f"disk_queue_full_policy must be 'block' or 'drop', got {queue_full_policy!r}"
            )
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise BackendError(f"capacity_bytes must be positive or None, got {capacity_bytes}")
        self.directory = Path(directory)
        self._sink = event_sink
        self._queue_size = write_queue_size
        self._policy = queue_full_policy
        self._fsync = fsync

        self._cond = threading.Condition(threading.Lock())
        self._index: collections.OrderedDict[ChunkKey, _Entry] = collections.OrderedDict()
        self._pending: dict[ChunkKey, _Pending] = {}
        self._queue: collections.deque[_Pending] = collections.deque()
        self._in_flight: _Pending | None = None
        self._used = 0
        self._tokens = 0
        self._reserved = 0  # bytes the writer has made room for but not yet indexed
        self._pinned_bytes = 0
        self._closing = False
        self._counters = dict.fromkeys(
            (
                "dropped",
                "blocked_puts",
                "rejected",
                "written",
                "write_errors",
                "evictions",
                "corrupt",
                "hits",
                "misses",
                "temp_files_removed",
                "legacy_files_adopted",
            ),
            0,
        )

        self._area = self._open_directory(instance_id)
        self.area = self._area.path
        self._shared = SharedAreas(self.directory, self.area)
        try:
            self._counters["legacy_files_adopted"] = adopt_root_files(
                self.directory, self._area, fsync=fsync
            )
            recovered = self._scan()
            self.capacity_auto = capacity_bytes is None
            if capacity_bytes is None:
                free = shutil.disk_usage(self.directory).free
                capacity_bytes = max(1, int(auto_capacity_fraction * (free + self._used)))
            self.capacity_bytes = capacity_bytes
            self._shrink_to_capacity()
            self._sync_directory()
        except BaseException:
            self._area.release()
            raise
        for key, entry in recovered:
            if key in self._index:  # announced only if it survived the capacity check
                self._sink.admitted(key, entry.num_tokens)

        self._writer = threading.Thread(
            target=self._run_writer, name=f"lmcache-disk-writer:{self.area}", daemon=True
        )
        self._writer.start()

    # --- the StorageBackend interface ---------------------------------------------------------

    def put(
        self,
        key: ChunkKey,
        data: torch.Tensor,
        num_tokens: int,
        on_done: Callback | None = None,
        encoding: ChunkEncoding | None = None,
    ) -> bool:
        """Queue ``data`` for writing; see ``StorageBackend.put`` (this backend writes behind).

        With ``encoding``, ``data`` is a codec's payload; the file records the encoding
        (chunk format version 2), so any process reading it knows how to decode it.
        """
        done_now = [on_done] if on_done is not None else []
        try:
            if not isinstance(data, torch.Tensor):
                raise BackendError(
                    f"LocalDiskBackend stores torch tensors, got {type(data).__name__}"
                )
            size = _file_size(key, data, num_tokens, encoding)
            with self._cond:
                if self._closing:
                    raise BackendError(f"LocalDiskBackend at {self.directory} is closed")
                admitted = self._enqueue_locked(key, data, num_tokens, size, on_done, encoding)
        except BaseException:
            _call(done_now)  # on_done runs exactly once, even when put fails
            raise
        if admitted is None:
            return True  # queued: the writer calls on_done
        _call(done_now)
        return admitted

    def _enqueue_locked(
        self,
        key: ChunkKey,
        data: torch.Tensor,
        num_tokens: int,
        size: int,
        on_done: Callback | None,
        encoding: ChunkEncoding | None,
    ) -> bool | None:
        """Queue a chunk; None when queued, else the put's result (on_done is then the caller's)."""
        blocked = False
        while True:
            if key in self._index or key in self._pending:
                return True
            if self._pinned_bytes + size > self.capacity_bytes:
                self._counters["rejected"] += 1  # could never fit, even after evicting all
                return False
            if len(self._queue) < self._queue_size:
                break
            if self._policy == "drop" or self._closing:
                self._counters["dropped"] += 1
                return False
            if not blocked:
                blocked = True
                self._counters["blocked_puts"] += 1
            self._cond.wait()
        item = _Pending(key, data, num_tokens, size, on_done, encoding)
        self._pending[key] = item
        self._queue.append(item)
        self._cond.notify_all()
        return None

    def get(self, key: ChunkKey) -> ChunkView | None:
        """The chunk (read and checksummed now, or the queued tensor); None on a miss.

        A key this backend does not hold is looked up in the other write areas; such a chunk
        is the caller's to keep and never joins this backend's index.
        """
        with self._cond:
            item = self._pending.get(key)
            if item is not None:
                item.readers += 1
                self._counters["hits"] += 1
                return ChunkView(
                    item.data, item.num_tokens, lambda: self._release_reader(item), item.encoding
                )
            entry = self._index.get(key)
            if entry is not None:
                self._index.move_to_end(key)
                try:
                    # opened under the lock so an eviction cannot delete it between lookup and open
                    f = open(entry.path, "rb", buffering=0)
                except FileNotFoundError:
                    self._drop_bad_entry_locked(key, entry, "the file is gone")
                    return None
                except OSError as exc:  # e.g. out of file descriptors: the file may be fine
                    logger.warning("LocalDiskBackend cannot open %s: %s", entry.path, exc.strerror)
                    self._counters["misses"] += 1
                    return None
        if entry is None:
            return self._get_shared(key)
        try:
            with f:
                tensor, header = read_chunk(f, key)
                _touch(f.fileno())
        except (CorruptChunkError, OSError) as exc:
            with self._cond:
                if self._index.get(key) is entry:
                    self._drop_bad_entry_locked(key, entry, str(exc))
                else:
                    self._counters["misses"] += 1
            return None
        with self._cond:
            self._counters["hits"] += 1
        return ChunkView(tensor, entry.num_tokens, encoding=header.encoding)

    def _get_shared(self, key: ChunkKey) -> ChunkView | None:
        found = self._shared.read(key)  # outside the lock: other areas are not ours to guard
        with self._cond:
            self._counters["hits" if found is not None else "misses"] += 1
        if found is None:
            return None
        tensor, header = found
        return ChunkView(tensor, header.num_tokens, encoding=header.encoding)

    def contains(self, key: ChunkKey) -> bool:
        """Whether ``get`` would find the chunk: here, or in another write area (checked by
        opening the file and verifying its header, so a deleted file is never reported)."""
        with self._cond:
            if key in self._index or key in self._pending:
                return True
        return self._shared.holds(key)

    def remove(self, key: ChunkKey) -> int:
        """Delete one chunk (queued or on disk); announces ``evicted`` for an admitted one."""
        callbacks: list[Callback] = []
        with self._cond:
            item = self._pending.pop(key, None)
            if item is not None:
                self._cancel_locked(item, callbacks)
                tokens = item.num_tokens
            else:
                entry = self._index.pop(key, None)
                tokens = 0
                if entry is not None:
                    self._delete_entry_locked(key, entry)
                    self._sink.evicted(key, entry.num_tokens)
                    tokens = entry.num_tokens
            self._cond.notify_all()
        _call(callbacks)
        return tokens

    def clear(self) -> int:
        """Delete every chunk (queued, pinned and stray files too); one ``cleared`` event."""
        callbacks: list[Callback] = []
        with self._cond:
            tokens = 0
            for item in list(self._pending.values()):
                self._cancel_locked(item, callbacks)
                tokens += item.num_tokens
            self._pending.clear()
            for key, entry in list(self._index.items()):
                self._delete_entry_locked(key, entry)
                tokens += entry.num_tokens
            self._index.clear()
            # chunk files of the area nobody indexed (copied in by hand, a failed delete) go too
            for path in self.area.glob(f"*{CHUNK_SUFFIX}"):
                _unlink_quietly(path)
            self._sync_directory()
            self._sink.cleared(tokens)
            self._cond.notify_all()
        _call(callbacks)
        return tokens

    def pin(self, key: ChunkKey) -> bool:
        with self._cond:
            target = self._index.get(key) or self._pending.get(key)
            if target is None:
                return False
            if target.pins == 0 and isinstance(target, _Entry):
                self._pinned_bytes += target.size
            target.pins += 1
            return True

    def unpin(self, key: ChunkKey) -> bool:
        with self._cond:
            target = self._index.get(key) or self._pending.get(key)
            if target is None or target.pins == 0:
                return False
            target.pins -= 1
            if target.pins == 0 and isinstance(target, _Entry):
                self._pinned_bytes -= target.size
            return True

    def replace(
        self, key: ChunkKey, data: torch.Tensor, encoding: ChunkEncoding | None
    ) -> bool:
        """Rewrite a chunk's file in another form (see ``StorageBackend.replace``).

        The new file is written under a temporary name and renamed over the old one, so a
        crash leaves either form, never neither. It runs under the backend's lock (an
        operator's recode is rare; a racing put, remove or clear of the key must not
        interleave with the rename). A chunk still queued for writing is left as it is.
        """
        with self._cond:
            if self._closing:
                raise BackendError(f"LocalDiskBackend at {self.directory} is closed")
            entry = self._index.get(key)
            if entry is None or key in self._pending:
                return False
            size = _file_size(key, data, entry.num_tokens, encoding)
            grow = size - entry.size
            protect = entry.pins == 0  # pinned meanwhile, so making room never evicts it
            if protect:
                entry.pins = 1
                self._pinned_bytes += entry.size
            try:
                if grow > 0 and not self._make_room_locked(grow):
                    return False
                item = _Pending(key, data, entry.num_tokens, size, None, encoding, queued=False)
                try:
                    self._write_file(item)
                except Exception as exc:
                    self._counters["write_errors"] += 1
                    raise BackendError(
                        f"LocalDiskBackend could not rewrite chunk {key.to_string()}: {exc}"
                    ) from exc
                self._used += grow
                self._pinned_bytes += grow
                entry.size = size
                self._index.move_to_end(key)
                return True
            finally:
                if protect:
                    entry.pins = 0
                    self._pinned_bytes -= entry.size

    def inventory(self) -> list[tuple[ChunkKey, int]]:
        """Chunks on disk (announced as admitted), least recently used first."""
        with self._cond:
            return [(key, entry.num_tokens) for key, entry in self._index.items()]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "location": self.location,
                "directory": str(self.directory),
                "area": str(self.area),
                "chunks": len(self._index),
                "tokens": self._tokens,
                "used_bytes": self._used,
                "capacity_bytes": self.capacity_bytes,
                "capacity_auto": self.capacity_auto,
                "pinned_bytes": self._pinned_bytes,
                "queued": len(self._queue) + (self._in_flight is not None),
                "queue_size": self._queue_size,
                "queue_full_policy": self._policy,
                "fsync": self._fsync,
                **self._counters,
                "shared_hits": self._shared.hits,
                "shared_corrupt": self._shared.corrupt,
            }

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written (or has failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and self._in_flight is None, timeout=timeout
            )

    def close(self) -> None:
        """Write what is queued, stop the writer thread and release the write area."""
        with self._cond:
            first = not self._closing
            self._closing = True
            self._cond.notify_all()
        self._writer.join()
        if first:  # one release even when two threads close at once
            self._area.release()

    def __repr__(self) -> str:
        return (
            f"LocalDiskBackend({str(self.directory)!r}, area={self.area.name!r}, "
            f"capacity_bytes={self.capacity_bytes})"
        )

    # --- the writer thread --------------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, and everything queued is written
                item = self._queue.popleft()
                item.queued = False
                self._in_flight = item
                self._cond.notify_all()  # a blocked put may use the freed queue slot
            callbacks: list[Callback] = []
            try:
                self._store(item, callbacks)
            except Exception:  # the writer must outlive any one chunk's failure
                logger.exception("LocalDiskBackend failed on chunk %s", item.key.to_string())
            finally:
                with self._cond:
                    self._finish_locked(item, callbacks)  # a no-op when _store finished it
            _call(callbacks)
            with self._cond:
                self._in_flight = None  # only now: flush returns after on_done has run
                self._cond.notify_all()

    def _store(self, item: _Pending, callbacks: list[Callback]) -> None:
        """Make room for one chunk, write it, index it and finish it (or leave the caller to)."""
        with self._cond:
            if item.cancelled:
                return
            if not self._make_room_locked(item.size):
                self._counters["rejected"] += 1
                return
            self._reserved += item.size
        try:
            path = self._write_file(item)
        except Exception as exc:
            logger.warning(
                "LocalDiskBackend could not write chunk %s: %s", item.key.to_string(), exc
            )
            with self._cond:
                self._counters["write_errors"] += 1
                self._reserved -= item.size
            return
        with self._cond:
            self._reserved -= item.size
            if item.cancelled:
                _unlink_quietly(path)  # removed or cleared while it was being written
                return
            entry = _Entry(item.num_tokens, item.size, path, item.pins)
            self._index[item.key] = entry
            self._used += entry.size
            self._tokens += entry.num_tokens
            if entry.pins:
                self._pinned_bytes += entry.size
            self._counters["written"] += 1
            # indexed and taken out of _pending in one step: never in both, never in neither
            self._finish_locked(item, callbacks)
            self._sink.admitted(item.key, item.num_tokens)

    def _write_file(self, item: _Pending) -> Path:
        """Write the chunk durably under its final name; returns that path."""
        tensor, raw = tensor_bytes(item.data)
        checksum = xxhash.xxh3_64_intdigest(raw)
        header = encode_header(
            item.key,
            tensor.dtype,
            tuple(tensor.shape),
            item.num_tokens,
            len(raw),
            checksum,
            item.encoding,
        )
        if len(header) + len(raw) != item.size:
            raise BackendError("the chunk's tensor changed size while it was queued")
        final = self.area / file_name(item.key)
        temp = self.area / f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, header)
                _write_all(fd, raw)
                _touch(fd)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            _unlink_quietly(temp)
            raise
        self._sync_directory()
        return final

    # --- helpers that run under the lock ------------------------------------------------------

    def _make_room_locked(self, size: int) -> bool:
        """Evict least recently used unpinned chunks until ``size`` more bytes fit."""
        if self._pinned_bytes + self._reserved + size > self.capacity_bytes:
            return False  # evicting everything unpinned would not be enough: evict nothing
        while self._used + self._reserved + size > self.capacity_bytes:
            victim = next(((k, e) for k, e in self._index.items() if e.pins == 0), None)
            if victim is None:
                return False
            key, entry = victim
            del self._index[key]
            self._delete_entry_locked(key, entry)
            self._counters["evictions"] += 1
            self._sink.evicted(key, entry.num_tokens)
        return True

    def _delete_entry_locked(self, key: ChunkKey, entry: _Entry) -> None:
        """Forget an entry already taken out of the index and delete its file."""
        self._used -= entry.size
        self._tokens -= entry.num_tokens
        if entry.pins:
            self._pinned_bytes -= entry.size
        _unlink_quietly(entry.path)

    def _drop_bad_entry_locked(self, key: ChunkKey, entry: _Entry, why: str) -> None:
        logger.warning(
            "LocalDiskBackend removes unreadable chunk file %s: %s", entry.path, why
        )
        del self._index[key]
        self._delete_entry_locked(key, entry)
        self._counters["corrupt"] += 1
        self._counters["misses"] += 1
        self._sink.evicted(key, entry.num_tokens)

    def _cancel_locked(self, item: _Pending, callbacks: list[Callback]) -> None:
        """Stop a queued or in-flight chunk (the caller has taken it out of ``_pending``)."""
        item.cancelled = True
        if item.queued:
            self._queue.remove(item)
            item.queued = False
            self._finish_locked(item, callbacks)
        # an in-flight item is finished by the writer, which deletes its file

    def _finish_locked(self, item: _Pending, callbacks: list[Callback]) -> None:
        """The item has left the pipeline; its on_done runs once no reader holds its tensor."""
        if self._pending.get(item.key) is item:
            del self._pending[item.key]
        item.settled = True
        if item.readers == 0 and item.on_done is not None:
            callbacks.append(item.on_done)
            item.on_done = None
        self._cond.notify_all()

    def _release_reader(self, item: _Pending) -> None:
        callbacks: list[Callback] = []
        with self._cond:
            item.readers -= 1
            if item.settled and item.readers == 0 and item.on_done is not None:
                callbacks.append(item.on_done)
                item.on_done = None
        _call(callbacks)

    # --- startup and the directory ------------------------------------------------------------

    def _open_directory(self, instance_id: str) -> WriteArea:
        """Create the shared directory when needed and claim a write area in it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(
                f"local_disk directory {self.directory} cannot be used: {exc.strerror}"
            ) from exc
        return claim_write_area(self.directory, instance_id, fsync=self._fsync)

    def _sync_directory(self) -> None:
        if self._fsync:
            self._area.sync()

    def _scan(self) -> list[tuple[ChunkKey, _Entry]]:
        """Rebuild the index from the own area's file headers, oldest modification first."""
        found: list[tuple[int, str, ChunkKey, _Entry]] = []
        with os.scandir(self.area) as it:
            for dirent in it:
                if not dirent.is_file(follow_symlinks=False):
                    continue
                path = Path(dirent.path)
                if dirent.name.startswith(".") and dirent.name.endswith(TEMP_SUFFIX):
                    _unlink_quietly(path)  # a write that never reached its rename
                    self._counters["temp_files_removed"] += 1
                    continue
                if not dirent.name.endswith(CHUNK_SUFFIX):
                    continue
                try:
                    st = dirent.stat(follow_symlinks=False)
                    with open(path, "rb", buffering=0) as f:
                        header = read_header(f, st.st_size)
                    if file_name(header.key) != dirent.name:
                        raise CorruptChunkError(f"file name does not match its key {header.key}")
                except (CorruptChunkError, OSError) as exc:
                    logger.warning("LocalDiskBackend removes bad chunk file %s: %s", path, exc)
                    _unlink_quietly(path)
                    self._counters["corrupt"] += 1
                    continue
                entry = _Entry(header.num_tokens, header.file_size, path)
                found.append((st.st_mtime_ns, dirent.name, header.key, entry))
        found.sort(key=lambda item: (item[0], item[1]))
        for _, _, key, entry in found:
            self._index[key] = entry
            self._used += entry.size
            self._tokens += entry.num_tokens
        return [(key, entry) for _, _, key, entry in found]

    def _shrink_to_capacity(self) -> None:
        """Delete the least recently used files beyond the capacity (never announced)."""
        while self._used > self.capacity_bytes and self._index:
            key, entry = self._index.popitem(last=False)
            self._delete_entry_locked(key, entry)
            self._counters["evictions"] += 1
