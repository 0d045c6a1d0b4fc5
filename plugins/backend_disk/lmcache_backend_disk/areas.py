"""Write areas: how several LocalDiskBackends share one ``local_disk`` directory.

Layout of a shared directory::

    local_disk/
        <area>/                   one write area per running backend
            .lmcache-disk.lock    flock held by the area's backend while it runs
            <key>.kvchunk         its chunk files (see chunkfile.py)
            .<uuid>.tmp           a write that has not reached its rename yet
        <other area>/...
        .lmcache-disk.lock        taken only briefly, to adopt old-layout files
        <key>.kvchunk             files of the old single-directory layout (adopted at startup)

A backend writes, evicts, clears and re-scans only its own area, which it holds an exclusive
flock on (an area is exactly the old single-directory format). The area is named after the
instance id; when that area is held by a live process the backend takes ``<name>.1``,
``<name>.2``, ... so instances with the same id all start. Every other area (and the root)
is read-only to it: a miss in its own index is looked up there by file name, every such read
is verified like an own read, and a missing or bad file is just a miss, never deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from lmcache_core.errors import BackendError
from lmcache_core.keys import ChunkKey

from lmcache_backend_disk.chunkfile import (
    CHUNK_SUFFIX,
    TEMP_SUFFIX,
    ChunkHeader,
    CorruptChunkError,
    file_name,
    read_chunk,
    read_header,
)

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".lmcache-disk.lock"
#: the instance id LMCache's settings default to
DEFAULT_INSTANCE_ID = "lmcache_default_instance"
#: ``<name>``, ``<name>.1`` ... ``<name>.{MAX_AREAS_PER_NAME - 1}`` are tried before giving up
MAX_AREAS_PER_NAME = 1000
#: area names stay short; a longer id keeps a prefix and gains a hash of the whole id
MAX_AREA_NAME_CHARS = 100
#: how long a listing of the other areas is reused when the directory's mtime has not moved
#: (mtimes are coarse: an area made within the same clock tick would otherwise stay unseen)
AREA_LIST_MAX_AGE = 1.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def area_name(instance_id: str) -> str:
    """A file-name-safe name for ``instance_id``'s write area (never hidden, never empty)."""
    name = _UNSAFE.sub("_", instance_id).lstrip(".")
    if len(name) > MAX_AREA_NAME_CHARS:
        digest = xxhash.xxh3_64_hexdigest(instance_id.encode("utf-8"))
        name = f"{name[: MAX_AREA_NAME_CHARS - 17]}~{digest}"
    return name or "instance"


def try_lock_directory(directory: Path) -> int | None:
    """Take the exclusive flock of ``directory``'s lock file; its descriptor (closing it
    releases the lock), or None while another process (or backend) holds it."""
    try:
        fd = os.open(directory / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BackendError(
            f"cannot create a lock file in local_disk directory {directory}: {exc.strerror}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise BackendError(f"cannot lock local_disk directory {directory}: {exc.strerror}") from exc
    return fd


def fsync_directory(directory: Path) -> None:
    """Make the entries created, renamed or deleted in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False, slots=True)
class WriteArea:
    """A backend's own area: its directory, a descriptor for fsyncs and the held lock."""

    path: Path
    dir_fd: int
    lock_fd: int

    def sync(self) -> None:
        """Make the area's renames and deletions durable (a no-op once released)."""
        if self.dir_fd >= 0:
            os.fsync(self.dir_fd)

    def release(self) -> None:
        """Close both descriptors (closing the lock file's releases the flock); idempotent."""
        fds, self.lock_fd, self.dir_fd = (self.lock_fd, self.dir_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def claim_write_area(root: Path, instance_id: str, *, fsync: bool) -> WriteArea:
    """Create (when needed) and lock the first free area for ``instance_id`` under ``root``."""
    base = area_name(instance_id)
    for n in range(MAX_AREAS_PER_NAME):
        path = root / (base if n == 0 else f"{base}.{n}")
        try:
            path.mkdir()
            if fsync:
                fsync_directory(root)  # the new area's entry in the root survives a crash
        except FileExistsError:
            if not path.is_dir() or path.is_symlink():
                continue  # a file (or link) took the name: not an area
        except OSError as exc:
            raise BackendError(f"cannot create write area {path}: {exc.strerror}") from exc
        lock_fd = try_lock_directory(path)
        if lock_fd is None:
            continue  # a live backend writes there
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(lock_fd)
            raise BackendError(f"cannot open write area {path}: {exc.strerror}") from exc
        return WriteArea(path, dir_fd, lock_fd)
    raise BackendError(
        f"local_disk directory {root} has no free write area for instance {instance_id!r}: "
        f"{base} to {base}.{MAX_AREAS_PER_NAME - 1} are all in use"
    )


def adopt_root_files(root: Path, area: WriteArea, *, fsync: bool) -> int:
    """Move the chunk and temporary files of the old single-directory layout from ``root``
    into ``area``, where the area's scan checks them like its own; returns how many moved.

    Done only while holding the root's own lock, so never under a running backend of the
    old layout (its files then stay in the root, still readable by every area's backend).
    """
    lock_fd = try_lock_directory(root)
    if lock_fd is None:
        logger.info("local_disk %s is locked by an old-layout backend: its files stay put", root)
        return 0
    moved = 0
    try:
        with os.scandir(root) as it:
            names = [
                d.name
                for d in it
                if d.is_file(follow_symlinks=False)
                and (d.name.endswith(CHUNK_SUFFIX) or _is_temp_name(d.name))
            ]
        for name in names:
            try:
                os.rename(root / name, area.path / name)  # same key, same bytes: replacing is fine
                moved += 1
            except FileNotFoundError:
                pass  # adopted by another backend between the listing and now
            except OSError as exc:
                logger.warning("cannot move %s into write area %s: %s", name, area.path, exc)
        if moved and fsync:
            area.sync()
            fsync_directory(root)
    finally:
        os.close(lock_fd)
    if moved:
        logger.info("moved %d files of the old local_disk layout into %s", moved, area.path)
    return moved


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


class SharedAreas:
    """Read-only access to the chunks other backends wrote under the same ``local_disk``:
    every area but the own one, and the root (files of the old layout not adopted yet).

    Nothing is cached about the files themselves, so a file its owner deleted is never a hit;
    only the list of areas is reused while the root's mtime stands still (at most a second).
    """

    def __init__(self, root: Path, own_area: Path) -> None:
        self.root = root
        self.own_area = own_area
        self._listing: tuple[float, int, tuple[Path, ...]] = (-AREA_LIST_MAX_AGE, -1, ())
        self._lock = threading.Lock()
        self.hits = 0
        self.corrupt = 0

    def read(self, key: ChunkKey) -> tuple[torch.Tensor, ChunkHeader] | None:
        """``key``'s tensor and header from the first area holding an intact file, else None."""
        name = file_name(key)
        for directory in self._directories():
            try:
                with open(directory / name, "rb", buffering=0) as f:
                    tensor, header = read_chunk(f, key)
            except FileNotFoundError:
                continue  # not there, or evicted by its owner while we looked
            except (CorruptChunkError, OSError) as exc:
                self._count_corrupt(directory / name, exc)
                continue
            with self._lock:
                self.hits += 1
            return tensor, header
        return None

    def holds(self, key: ChunkKey) -> bool:
        """Whether some other area has a file for ``key`` whose header checks out (the data
        is verified only by ``read``)."""
        name = file_name(key)
        for directory in self._directories():
            try:
                with open(directory / name, "rb", buffering=0) as f:
                    if read_header(f, os.fstat(f.fileno()).st_size).key == key:
                        return True
            except (CorruptChunkError, OSError):
                continue
        return False

    def _count_corrupt(self, path: Path, exc: Exception) -> None:
        # the owner deletes it when it next reads or scans it; here it is only a miss
        logger.debug("LocalDiskBackend skips unreadable shared chunk file %s: %s", path, exc)
        with self._lock:
            self.corrupt += 1

    def _directories(self) -> tuple[Path, ...]:
        """The other areas and the root, listed again when the root changed or a second passed."""
        try:
            mtime = os.stat(self.root).st_mtime_ns
        except OSError:
            return ()
        listed_at, listed_mtime, directories = self._listing
        now = time.monotonic()
        if mtime == listed_mtime and now - listed_at < AREA_LIST_MAX_AGE:
            return directories
        found: list[Path] = []
        try:
            with os.scandir(self.root) as it:
                for d in it:
                    if d.name.startswith(".") or d.name == self.own_area.name:
                        continue
                    if d.is_dir(follow_symlinks=False):
                        found.append(Path(d.path))
        except OSError:
            return directories
        directories = (*sorted(found), self.root)
        self._listing = (now, mtime, directories)  # one tuple: readers never see half of it
        return directories
