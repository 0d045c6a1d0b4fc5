"""Corrupt, torn and leftover files are never served; a restart rebuilds the index."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from disk_helpers import (
    CRASH_SHAPE,
    Events,
    chunk_files,
    crash_tokens,
    data_for,
    fill,
    flip_byte,
    key_of,
    same_bits,
    temp_files,
    wait_until,
)
from lmcache_core.errors import BackendError
from lmcache_backend_disk import LocalDiskBackend
from lmcache_backend_disk.areas import try_lock_directory

HERE = Path(__file__).parent


def test_flipped_data_byte_is_a_miss_that_removes_the_file_and_counts_it(
    backend: LocalDiskBackend, area_dir: Path, events: Events
) -> None:
    fill(backend, range(2))
    victim = area_dir / (key_of(0).to_string() + ".kvchunk")
    flip_byte(victim, -1)

    assert backend.get(key_of(0)) is None
    assert not victim.exists()
    assert not backend.contains(key_of(0))
    stats = backend.stats()
    assert (stats["corrupt"], stats["misses"], stats["chunks"]) == (1, 1, 1)
    assert stats["used_bytes"] == chunk_files(area_dir)[0].stat().st_size
    assert events.keys("EVICT") == [key_of(0)]
    with backend.get(key_of(1)) as view:  # the neighbour is untouched
        assert same_bits(view.tensor, data_for(1))


def test_flipped_header_byte_is_a_miss_too(backend: LocalDiskBackend, area_dir: Path) -> None:
    fill(backend, range(1))
    flip_byte(area_dir / (key_of(0).to_string() + ".kvchunk"), 20)  # inside num_tokens
    assert backend.get(key_of(0)) is None
    assert backend.stats()["corrupt"] == 1 and chunk_files(area_dir) == []


def test_startup_removes_temp_files_torn_files_and_bad_headers(
    make_backend, area_dir: Path
) -> None:
    backend = make_backend()
    fill(backend, range(4))
    backend.close()
    files = {p.name: p for p in chunk_files(area_dir)}
    name = lambda i: key_of(i).to_string() + ".kvchunk"  # noqa: E731
    os.truncate(files[name(1)], files[name(1)].stat().st_size - 1)  # a torn write
    flip_byte(files[name(2)], 0)  # bad magic
    (area_dir / ".0123abcd.tmp").write_bytes(b"half a chunk")  # a write cut before its rename
    (area_dir / "notes.txt").write_text("not ours")  # foreign files are left alone

    events = Events()
    reopened = make_backend(sink=events.sink)

    assert sorted(k.chunk_hash for k, _ in reopened.inventory()) == [0, 3]
    assert sorted(p.name for p in chunk_files(area_dir)) == sorted([name(0), name(3)])
    assert temp_files(area_dir) == []
    assert (area_dir / "notes.txt").exists()
    stats = reopened.stats()
    assert (stats["corrupt"], stats["temp_files_removed"]) == (2, 1)
    assert sorted(k.chunk_hash for k in events.keys("ADMIT")) == [0, 3]


def test_restart_rebuilds_the_same_inventory_and_announces_it(
    make_backend, area_dir: Path
) -> None:
    backend = make_backend()
    fill(backend, range(5), tokens=7)
    with backend.get(key_of(0)):  # a use: chunk 0 becomes the most recently used
        pass
    before = backend.inventory()
    used = backend.stats()["used_bytes"]
    backend.close()

    events = Events()
    reopened = make_backend(sink=events.sink)

    assert reopened.inventory() == before  # same chunks, same LRU order
    assert [k for k, _ in before][-1] == key_of(0)
    assert reopened.stats()["used_bytes"] == used
    assert events.kinds() == ["ADMIT"] * 5
    assert [(e.key, e.num_tokens) for e in events.seen] == before
    for i in range(5):
        with reopened.get(key_of(i)) as view:
            assert view.num_tokens == 7 and same_bits(view.tensor, data_for(i))


def test_restart_with_a_lower_capacity_keeps_the_most_recently_used(
    make_backend, area_dir: Path
) -> None:
    backend = make_backend()
    fill(backend, range(5))
    for i in (3, 1):  # uses, in this order: the LRU order becomes 0 2 4 3 1
        backend.get(key_of(i)).release()
    size = chunk_files(area_dir)[0].stat().st_size
    backend.close()

    events = Events()
    reopened = make_backend(sink=events.sink, capacity_bytes=2 * size)

    assert [k.chunk_hash for k, _ in reopened.inventory()] == [3, 1]
    assert len(chunk_files(area_dir)) == 2
    assert reopened.stats()["evictions"] == 3
    assert [k.chunk_hash for k in events.keys("ADMIT")] == [3, 1]  # the evicted never announced


def test_a_second_backend_never_takes_a_write_area_in_use(make_backend, area_dir: Path) -> None:
    first = make_backend()
    assert try_lock_directory(area_dir) is None  # the area's lock is held while it runs
    second = make_backend()
    assert (first.area, second.area) == (area_dir, area_dir.with_name(area_dir.name + ".1"))
    first.close()
    fd = try_lock_directory(area_dir)  # closing released it
    assert fd is not None
    os.close(fd)


def test_directory_that_is_a_file_fails_with_a_clear_error(make_backend, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BackendError, match="local_disk directory .*a_file"):
        make_backend(directory=blocker)


def test_sigkill_mid_write_leaves_only_complete_bit_exact_chunks(
    make_backend, disk_dir: Path, area_dir: Path
) -> None:
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "disk_crash_writer.py"), str(disk_dir)],
        stdin=subprocess.PIPE,
        cwd=HERE,
    )
    try:
        # kill while a write is under way: some chunks renamed, one in a temp file
        wait_until(
            lambda: len(chunk_files(area_dir)) >= 8 and bool(temp_files(area_dir)),
            timeout=60,
            what="the writer subprocess to store chunks",
        )
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    on_disk = len(chunk_files(area_dir))
    torn = temp_files(area_dir)  # the write the kill interrupted, if it landed in one
    print(f"killed with {on_disk} chunk files and {len(torn)} temp files")

    events = Events()
    reopened = make_backend(sink=events.sink)

    assert temp_files(area_dir) == []
    inventory = reopened.inventory()
    assert len(inventory) >= 8 and len(inventory) == on_disk == len(chunk_files(area_dir))
    for key, tokens in inventory:
        i = key.chunk_hash
        assert tokens == crash_tokens(i)
        with reopened.get(key) as view:
            assert same_bits(view.tensor, data_for(i, CRASH_SHAPE)), f"chunk {i} differs"
    assert reopened.stats()["corrupt"] == 0
    assert reopened.stats()["temp_files_removed"] == len(torn)


def test_file_deleted_behind_the_backends_back_is_a_miss_and_leaves_the_index(
    backend: LocalDiskBackend, area_dir: Path, events: Events
) -> None:
    fill(backend, range(1))
    (area_dir / (key_of(0).to_string() + ".kvchunk")).unlink()

    assert backend.get(key_of(0)) is None
    assert backend.inventory() == [] and backend.stats()["used_bytes"] == 0
    assert events.kinds() == ["ADMIT", "EVICT"]
