"""The write-behind queue: bounded, with backpressure or drops, on_done exactly once, drained on close."""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest
import torch

from disk_helpers import Events, chunk_files, data_for, key_of
from lmcache_core.errors import BackendError
from lmcache_backend_disk import LocalDiskBackend

MIB_SHAPE = (256, 1024)  # float32: 1 MiB, so each fsynced write takes far longer than a put


def burst(backend: LocalDiskBackend, n: int) -> tuple[list[bool], collections.Counter[int]]:
    """Put n distinct 1 MiB chunks back to back; the results and on_done calls per chunk."""
    calls: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def done(i: int) -> None:
        with lock:
            calls[i] += 1

    data = torch.ones(MIB_SHAPE)  # one tensor, unchanged throughout: many keys may share it
    results = []
    for i in range(n):
        results.append(backend.put(key_of(i), data, 16, on_done=lambda i=i: done(i)))
        assert backend.stats()["queued"] <= backend.stats()["queue_size"] + 1  # + the one in flight
    return results, calls


def test_drop_policy_drops_and_counts_chunks_beyond_a_full_queue(
    make_backend, area_dir: Path
) -> None:
    backend = make_backend(
        capacity_bytes=1 << 30, write_queue_size=1, queue_full_policy="drop", fsync=True
    )
    results, calls = burst(backend, 60)
    assert backend.flush(timeout=60)

    stats = backend.stats()
    assert stats["dropped"] >= 1, "a 60-chunk burst into a 1-slot queue dropped nothing"
    assert results.count(False) == stats["dropped"]
    assert stats["written"] + stats["dropped"] == 60
    assert stats["blocked_puts"] == 0
    assert calls == collections.Counter(range(60))  # on_done exactly once, dropped ones too
    stored = {k.chunk_hash for k, _ in backend.inventory()}
    assert stored == {i for i, ok in enumerate(results) if ok}
    assert len(chunk_files(area_dir)) == stats["written"]


def test_block_policy_makes_put_wait_and_loses_nothing(make_backend) -> None:
    backend = make_backend(
        capacity_bytes=1 << 30, write_queue_size=1, queue_full_policy="block", fsync=True
    )
    results, calls = burst(backend, 30)
    assert backend.flush(timeout=60)

    stats = backend.stats()
    assert all(results)
    assert stats["blocked_puts"] >= 1, "a 30-chunk burst into a 1-slot queue never waited"
    assert (stats["dropped"], stats["written"], stats["chunks"]) == (0, 30, 30)
    assert calls == collections.Counter(range(30))


def test_close_writes_everything_queued_first(make_backend, area_dir: Path) -> None:
    backend = make_backend(write_queue_size=16)
    done = [threading.Event() for _ in range(10)]
    for i in range(10):
        assert backend.put(key_of(i), data_for(i, MIB_SHAPE, torch.float32), 16, on_done=done[i].set)

    backend.close()

    assert all(event.is_set() for event in done)
    assert len(chunk_files(area_dir)) == 10
    reopened = make_backend(sink=Events().sink)
    assert len(reopened.inventory()) == 10


def test_put_after_close_raises_and_still_calls_on_done(backend: LocalDiskBackend) -> None:
    backend.close()
    done = threading.Event()
    with pytest.raises(BackendError, match="closed"):
        backend.put(key_of(0), data_for(0), 16, on_done=done.set)
    assert done.is_set()
    backend.close()  # closing twice is harmless


def test_failed_write_calls_on_done_and_announces_nothing(
    backend: LocalDiskBackend, area_dir: Path, events: Events
) -> None:
    done = threading.Event()
    unreadable = torch.empty(1024, device="meta")  # has a size but no bytes to copy out

    assert backend.put(key_of(0), unreadable, 16, on_done=done.set)
    assert backend.flush(timeout=30)

    assert done.is_set()
    assert backend.stats()["write_errors"] == 1
    assert not backend.contains(key_of(0))
    assert list(area_dir.iterdir()) == [area_dir / ".lmcache-disk.lock"]  # no file, no temp file
    assert events.seen == []


def test_remove_of_a_queued_chunk_cancels_its_write(make_backend, area_dir: Path) -> None:
    backend = make_backend(write_queue_size=64)
    done = {i: threading.Event() for i in range(20)}
    for i in range(20):
        backend.put(key_of(i), data_for(i, MIB_SHAPE, torch.float32), 16, on_done=done[i].set)

    assert backend.remove(key_of(19)) == 16  # the last one put: queued or in flight or written

    assert backend.flush(timeout=60)
    assert not backend.contains(key_of(19))
    assert not (area_dir / (key_of(19).to_string() + ".kvchunk")).exists()
    assert all(event.is_set() for event in done.values())
    assert len(chunk_files(area_dir)) == 19


def test_concurrent_puts_gets_and_removes_keep_index_and_files_consistent(
    make_backend, area_dir: Path
) -> None:
    backend = make_backend(capacity_bytes=40 * 70_000, write_queue_size=4)
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(offset, offset + 60):
                backend.put(key_of(i), data_for(i % 7, (128, 128), torch.float32), 4)
                view = backend.get(key_of(i - 3))
                if view is not None:
                    assert torch.equal(view.tensor, data_for((i - 3) % 7, (128, 128), torch.float32))
                    view.release()
                if i % 5 == 0:
                    backend.remove(key_of(i - 1))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert backend.flush(timeout=60)

    assert errors == []
    stats = backend.stats()
    files = chunk_files(area_dir)
    assert stats["chunks"] == len(files) == len(backend.inventory())
    assert stats["tokens"] == sum(tokens for _, tokens in backend.inventory())
    assert stats["used_bytes"] == sum(p.stat().st_size for p in files) <= stats["capacity_bytes"]
