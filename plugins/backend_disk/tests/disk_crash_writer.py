"""Writes chunks to a LocalDiskBackend as fast as it can until the test kills it with SIGKILL.

Usage: python disk_crash_writer.py DIRECTORY. Chunk i holds ``data_for(i, CRASH_SHAPE)`` and
``i % 256 + 1`` tokens, so the killing test can check every chunk that survives.
"""

from __future__ import annotations

import sys

from disk_helpers import CRASH_SHAPE, Events, crash_tokens, data_for, key_of
from lmcache_backend_disk import LocalDiskBackend


MAX_CHUNKS = 400


def main(directory: str) -> None:
    backend = LocalDiskBackend(
        directory, Events().sink, capacity_bytes=1 << 40, write_queue_size=4, fsync=True
    )
    # bounded, and waiting on stdin afterwards, so an orphan never fills the disk
    for i in range(MAX_CHUNKS):
        backend.put(key_of(i), data_for(i, CRASH_SHAPE), crash_tokens(i))
    backend.flush()
    sys.stdin.read()  # returns when the test closes the pipe or dies; normally SIGKILL comes first


if __name__ == "__main__":
    main(sys.argv[1])
