"""Capacity, LRU eviction, pins, remove and clear."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import torch

from disk_helpers import Events, chunk_files, data_for, key_of
from lmcache_backend_disk import LocalDiskBackend


def file_size_of_one_chunk(make_backend, tmp_path: Path) -> int:
    """The bytes one test chunk takes on disk (header + data), measured on a scratch backend."""
    probe = make_backend(directory=tmp_path / "probe", sink=Events().sink)
    probe.put(key_of(0), data_for(0), 16)
    assert probe.flush(timeout=30)
    probe.close()
    return chunk_files(probe.area)[0].stat().st_size


def put_and_flush(backend: LocalDiskBackend, i: int, tokens: int = 16) -> bool:
    accepted = backend.put(key_of(i), data_for(i), tokens)
    assert backend.flush(timeout=30)
    return accepted


def test_lru_eviction_keeps_the_recently_used_within_capacity(
    make_backend, tmp_path: Path, area_dir: Path, events: Events
) -> None:
    size = file_size_of_one_chunk(make_backend, tmp_path)
    backend = make_backend(capacity_bytes=3 * size)
    for i in range(3):
        put_and_flush(backend, i)
    backend.get(key_of(0)).release()  # 0 is now the most recently used; 1 the least

    put_and_flush(backend, 3)
    put_and_flush(backend, 4)

    assert [k.chunk_hash for k, _ in backend.inventory()] == [0, 3, 4]
    assert len(chunk_files(area_dir)) == 3
    assert not (area_dir / (key_of(1).to_string() + ".kvchunk")).exists()
    assert [k.chunk_hash for k in events.keys("EVICT")] == [1, 2]
    stats = backend.stats()
    assert stats["evictions"] == 2
    assert stats["used_bytes"] == 3 * size <= stats["capacity_bytes"]
    # announcements keep the order of changes: each eviction precedes the admit it made room for
    assert events.kinds() == ["ADMIT"] * 3 + ["EVICT", "ADMIT"] * 2


def test_contains_does_not_count_as_a_use(make_backend, tmp_path: Path) -> None:
    size = file_size_of_one_chunk(make_backend, tmp_path)
    backend = make_backend(capacity_bytes=2 * size)
    put_and_flush(backend, 0)
    put_and_flush(backend, 1)
    assert backend.contains(key_of(0))
    put_and_flush(backend, 2)
    assert not backend.contains(key_of(0)) and backend.contains(key_of(1))


def test_pinned_chunks_are_skipped_by_eviction(make_backend, tmp_path: Path) -> None:
    size = file_size_of_one_chunk(make_backend, tmp_path)
    backend = make_backend(capacity_bytes=2 * size)
    put_and_flush(backend, 0)
    put_and_flush(backend, 1)
    assert backend.pin(key_of(0))

    assert put_and_flush(backend, 2)

    assert [k.chunk_hash for k, _ in backend.inventory()] == [0, 2]
    assert backend.stats()["pinned_bytes"] == size
    assert backend.unpin(key_of(0)) and not backend.unpin(key_of(0))
    put_and_flush(backend, 3)
    assert [k.chunk_hash for k, _ in backend.inventory()] == [2, 3]


def test_put_is_refused_when_every_resident_chunk_is_pinned(make_backend, tmp_path: Path) -> None:
    size = file_size_of_one_chunk(make_backend, tmp_path)
    backend = make_backend(capacity_bytes=2 * size)
    for i in range(2):
        put_and_flush(backend, i)
        assert backend.pin(key_of(i))
    done = threading.Event()

    assert not backend.put(key_of(9), data_for(9), 16, on_done=done.set)

    assert done.is_set()
    assert backend.stats()["rejected"] == 1
    assert not backend.contains(key_of(9))
    assert [k.chunk_hash for k, _ in backend.inventory()] == [0, 1]


def test_pin_of_a_queued_chunk_carries_over_once_it_is_written(
    make_backend, tmp_path: Path
) -> None:
    size = file_size_of_one_chunk(make_backend, tmp_path)
    backend = make_backend(capacity_bytes=2 * size)
    backend.put(key_of(0), data_for(0), 16)
    assert backend.pin(key_of(0))  # queued or already written: either way it is pinned
    assert backend.flush(timeout=30)
    put_and_flush(backend, 1)
    put_and_flush(backend, 2)
    assert [k.chunk_hash for k, _ in backend.inventory()] == [0, 2]
    assert not backend.pin(key_of(1))


def test_chunk_larger_than_the_capacity_is_refused(make_backend) -> None:
    backend = make_backend(capacity_bytes=4096)
    done = threading.Event()
    big = torch.zeros(8192, dtype=torch.uint8)
    assert not backend.put(key_of(0), big, 16, on_done=done.set)
    assert done.is_set() and backend.stats()["rejected"] == 1 and backend.inventory() == []


def test_remove_deletes_the_file_and_announces_the_eviction(
    backend: LocalDiskBackend, area_dir: Path, events: Events
) -> None:
    put_and_flush(backend, 0, tokens=11)
    backend.pin(key_of(0))  # pins do not protect against remove

    assert backend.remove(key_of(0)) == 11
    assert backend.remove(key_of(0)) == 0

    assert chunk_files(area_dir) == [] and not backend.contains(key_of(0))
    assert events.kinds() == ["ADMIT", "EVICT"] and events.seen[-1].num_tokens == 11
    assert backend.stats()["used_bytes"] == 0 and backend.stats()["pinned_bytes"] == 0


def test_clear_reports_tokens_removed_from_disk(
    backend: LocalDiskBackend, area_dir: Path, events: Events
) -> None:
    for i in range(4):
        backend.put(key_of(i), data_for(i), 10 + i)
    assert backend.flush(timeout=30)
    backend.pin(key_of(2))
    (area_dir / ("stray" + ".kvchunk")).write_bytes(b"left by a crashed writer")

    assert backend.clear() == 10 + 11 + 12 + 13

    assert chunk_files(area_dir) == []
    assert events.kinds()[-1] == "CLEAR" and events.seen[-1].num_tokens == 46
    assert events.kinds().count("CLEAR") == 1
    stats = backend.stats()
    assert (stats["chunks"], stats["tokens"], stats["used_bytes"]) == (0, 0, 0)
    assert backend.clear() == 0  # an empty location clears to nothing
    put_and_flush(backend, 7)  # and stays usable
    assert backend.contains(key_of(7))


def test_zero_max_local_disk_size_means_a_share_of_the_free_space(
    make_backend, area_dir: Path
) -> None:
    """LMCache's default capacity 0 is never unbounded: it becomes the configured fraction of
    the filesystem's free space plus what the directory's chunk files already use."""
    first = make_backend(capacity_bytes=1 << 30)
    put_and_flush(first, 0)
    used = first.stats()["used_bytes"]
    first.close()

    free_before = shutil.disk_usage(area_dir).free
    backend = make_backend(capacity_bytes=None, auto_capacity_fraction=0.25)
    free_after = shutil.disk_usage(area_dir).free

    stats = backend.stats()
    assert stats["capacity_auto"] is True
    low = int(0.25 * (min(free_before, free_after) + used))
    high = int(0.25 * (max(free_before, free_after) + used))
    slack = 64 * 1024 * 1024  # other processes may write to this filesystem meanwhile
    assert low - slack <= stats["capacity_bytes"] <= high + slack
    assert 0 < stats["capacity_bytes"] < shutil.disk_usage(area_dir).total
    assert backend.inventory() == [(key_of(0), 16)]
