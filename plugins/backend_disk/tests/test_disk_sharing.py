"""Several backends on one local_disk directory: own write areas, reads across areas."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pluggy

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
from lmcache_core.config import load_settings
from lmcache_core.plugins import resolve_location
from lmcache_backend_disk import LocalDiskBackend, area_name, file_name
from lmcache_backend_disk.areas import LOCK_FILE_NAME, try_lock_directory

MakeBackend = Callable[..., LocalDiskBackend]
HERE = Path(__file__).parent


def pair(make_backend: MakeBackend, id_a: str = "vllm-a", id_b: str = "vllm-b", **kwargs):
    """Two backends open at once on the same directory, each with its own event recorder."""
    events_a, events_b = Events(), Events()
    a = make_backend(instance_id=id_a, sink=events_a.sink, **kwargs)
    b = make_backend(instance_id=id_b, sink=events_b.sink, **kwargs)
    return a, events_a, b, events_b


def test_backends_with_different_ids_share_a_directory_each_writing_its_own_area(
    make_backend: MakeBackend, disk_dir: Path
) -> None:
    a, _, b, _ = pair(make_backend)
    fill(a, range(0, 3))
    fill(b, range(10, 12))

    assert (a.area, b.area) == (disk_dir / "vllm-a", disk_dir / "vllm-b")
    assert [p.name for p in chunk_files(a.area)] == sorted(file_name(key_of(i)) for i in range(3))
    assert [p.name for p in chunk_files(b.area)] == sorted(
        file_name(key_of(i)) for i in range(10, 12)
    )
    assert chunk_files(disk_dir) == []  # nothing is written to the shared root itself
    assert a.stats()["area"] == str(a.area) and a.stats()["directory"] == str(disk_dir)


def test_backends_with_the_same_id_both_start_and_read_each_other(
    make_backend: MakeBackend, disk_dir: Path
) -> None:
    a, _, b, _ = pair(make_backend, "same", "same")
    assert (a.area.name, b.area.name) == ("same", "same.1")
    fill(a, [1])
    fill(b, [2])
    with b.get(key_of(1)) as view:
        assert same_bits(view.tensor, data_for(1))
    with a.get(key_of(2)) as view:
        assert same_bits(view.tensor, data_for(2))


def test_an_instance_in_another_process_with_the_same_id_shares_the_directory(
    make_backend: MakeBackend, disk_dir: Path, area_dir: Path
) -> None:
    writer = subprocess.Popen(  # a second instance: same default id, same local_disk
        [sys.executable, str(HERE / "disk_crash_writer.py"), str(disk_dir)],
        stdin=subprocess.PIPE,
        cwd=HERE,
    )
    try:
        wait_until(lambda: len(chunk_files(area_dir)) >= 2, timeout=60, what="the writer process")
        here = make_backend()
        assert here.area == area_dir.with_name(area_dir.name + ".1")
        with here.get(key_of(1)) as view:
            assert view.num_tokens == crash_tokens(1)
            assert same_bits(view.tensor, data_for(1, CRASH_SHAPE))
        assert here.inventory() == []
    finally:
        writer.kill()
        writer.wait()


def test_a_chunk_of_another_area_is_read_bit_exact_and_stays_out_of_this_backend(
    make_backend: MakeBackend,
) -> None:
    a, _, b, events_b = pair(make_backend)
    fill(a, [7], tokens=13)

    assert b.contains(key_of(7))
    view = b.get(key_of(7))
    assert view is not None
    with view:
        assert view.num_tokens == 13 and same_bits(view.tensor, data_for(7))
    assert b.inventory() == [] and events_b.seen == []
    stats = b.stats()
    assert (stats["hits"], stats["shared_hits"], stats["chunks"], stats["used_bytes"]) == (1, 1, 0, 0)
    assert not b.pin(key_of(7))  # not this backend's chunk: nothing to pin
    assert b.remove(key_of(7)) == 0 and a.contains(key_of(7))  # nor to remove


def test_chunks_removed_or_cleared_by_their_owner_are_misses_elsewhere(
    make_backend: MakeBackend,
) -> None:
    a, _, b, events_b = pair(make_backend)
    fill(a, range(3))
    assert all(b.contains(key_of(i)) for i in range(3))

    a.remove(key_of(0))
    assert not b.contains(key_of(0)) and b.get(key_of(0)) is None
    a.clear()
    for i in (1, 2):
        assert not b.contains(key_of(i)) and b.get(key_of(i)) is None
    stats = b.stats()
    assert (stats["misses"], stats["shared_corrupt"], stats["corrupt"]) == (3, 0, 0)
    assert events_b.seen == []


def test_a_corrupt_file_in_another_area_is_a_miss_left_for_its_owner(
    make_backend: MakeBackend,
) -> None:
    a, events_a, b, events_b = pair(make_backend)
    fill(a, range(2))
    victim = a.area / file_name(key_of(0))
    flip_byte(victim, -1)  # the data checksum fails; the header is still fine

    assert b.get(key_of(0)) is None
    assert victim.exists()
    stats = b.stats()
    assert (stats["shared_corrupt"], stats["corrupt"], stats["misses"]) == (1, 0, 1)
    assert events_b.seen == []
    with b.get(key_of(1)) as view:  # its neighbour still reads fine
        assert same_bits(view.tensor, data_for(1))

    flip_byte(victim, 20)  # now the header too: contains no longer vouches for it
    assert not b.contains(key_of(0)) and victim.exists()
    assert a.get(key_of(0)) is None and not victim.exists()  # the owner removes it
    assert events_a.keys("EVICT") == [key_of(0)]


def test_a_file_naming_another_key_is_never_served(make_backend: MakeBackend) -> None:
    a, _, b, _ = pair(make_backend)
    fill(a, [3])
    (a.area / file_name(key_of(3))).rename(a.area / file_name(key_of(4)))
    assert not b.contains(key_of(4)) and b.get(key_of(4)) is None


def test_restart_rescans_only_the_own_area(make_backend: MakeBackend, disk_dir: Path) -> None:
    a, _, b, _ = pair(make_backend)
    fill(a, range(3))
    fill(b, range(10, 13))
    (a.area / ".0123abcd.tmp").write_bytes(b"cut before its rename")
    (b.area / ".4567cdef.tmp").write_bytes(b"b is writing this one")
    a.close()

    events = Events()
    reopened = make_backend(instance_id="vllm-a", sink=events.sink)

    assert reopened.area == disk_dir / "vllm-a"
    assert sorted(k.chunk_hash for k, _ in reopened.inventory()) == [0, 1, 2]
    assert sorted(k.chunk_hash for k in events.keys("ADMIT")) == [0, 1, 2]
    assert temp_files(reopened.area) == [] and len(temp_files(b.area)) == 1
    assert len(chunk_files(b.area)) == 3 and sorted(k.chunk_hash for k, _ in b.inventory()) == [
        10,
        11,
        12,
    ]
    with reopened.get(key_of(11)) as view:
        assert same_bits(view.tensor, data_for(11))


def test_other_areas_never_use_up_this_backends_capacity(
    make_backend: MakeBackend, tmp_path: Path
) -> None:
    a = make_backend(instance_id="big", sink=Events().sink)
    fill(a, range(6))
    size = chunk_files(a.area)[0].stat().st_size

    b = make_backend(instance_id="small", sink=Events().sink, capacity_bytes=2 * size)
    assert b.stats()["used_bytes"] == 0
    fill(b, range(10, 12))
    assert b.stats()["evictions"] == 0 and b.stats()["used_bytes"] == 2 * size
    fill(b, [12])  # b evicts its own least recently used chunk, never a's
    assert b.stats()["evictions"] == 1 and len(chunk_files(a.area)) == 6


def test_a_new_area_is_seen_by_a_backend_started_before_it(make_backend: MakeBackend) -> None:
    early = make_backend(instance_id="early", sink=Events().sink)
    assert early.get(key_of(5)) is None  # lists the areas once: none but its own yet
    late = make_backend(instance_id="late", sink=Events().sink)
    fill(late, [5])
    # the listing is renewed when the root's mtime moves, or at the latest after a second
    wait_until(lambda: early.contains(key_of(5)), timeout=10, what="the new area to be seen")
    with early.get(key_of(5)) as view:
        assert same_bits(view.tensor, data_for(5))


def make_old_layout(make_backend: MakeBackend, disk_dir: Path, ids: range) -> None:
    """Chunk files (and a leftover temp file) directly in the root, as the old layout had."""
    scratch = make_backend(instance_id="scratch", sink=Events().sink)
    fill(scratch, ids)
    scratch.close()
    for path in chunk_files(scratch.area):
        path.rename(disk_dir / path.name)
    (disk_dir / ".89abcdef.tmp").write_bytes(b"cut before its rename")
    os.unlink(scratch.area / LOCK_FILE_NAME)
    scratch.area.rmdir()


def test_old_layout_files_in_the_root_are_adopted_into_the_first_area(
    make_backend: MakeBackend, disk_dir: Path
) -> None:
    make_old_layout(make_backend, disk_dir, range(4))
    events = Events()
    a = make_backend(instance_id="vllm-a", sink=events.sink)

    assert chunk_files(disk_dir) == [] and temp_files(disk_dir) == []
    assert len(chunk_files(a.area)) == 4 and temp_files(a.area) == []
    assert sorted(k.chunk_hash for k, _ in a.inventory()) == [0, 1, 2, 3]
    assert sorted(k.chunk_hash for k in events.keys("ADMIT")) == [0, 1, 2, 3]
    stats = a.stats()
    assert (stats["legacy_files_adopted"], stats["temp_files_removed"]) == (5, 1)
    with a.get(key_of(2)) as view:
        assert same_bits(view.tensor, data_for(2))


def test_old_layout_files_of_a_running_old_backend_stay_put_and_are_readable(
    make_backend: MakeBackend, disk_dir: Path
) -> None:
    make_old_layout(make_backend, disk_dir, range(2))
    old_backend_lock = try_lock_directory(disk_dir)  # what a backend of the old layout holds
    assert old_backend_lock is not None
    try:
        a = make_backend(instance_id="vllm-a", sink=Events().sink)
        assert len(chunk_files(disk_dir)) == 2 and a.inventory() == []
        assert a.stats()["legacy_files_adopted"] == 0
        assert a.contains(key_of(1))
        with a.get(key_of(1)) as view:
            assert same_bits(view.tensor, data_for(1))
    finally:
        os.close(old_backend_lock)


def test_area_names_are_safe_file_names() -> None:
    assert area_name("lmcache_default_instance") == "lmcache_default_instance"
    assert area_name("pod/7 a:b") == "pod_7_a_b"
    assert area_name("../../etc") == "_.._etc"
    assert area_name("...") == "instance"
    long = area_name("x" * 500)
    assert len(long) <= 100 and long != area_name("x" * 499)


def test_factory_names_the_area_after_lmcache_instance_id(
    plugin_manager: pluggy.PluginManager, tmp_path: Path
) -> None:
    spec = resolve_location(plugin_manager, "LocalDiskBackend")
    opened = []
    try:
        for instance_id in ("prefill-0", "decode-0"):
            settings = load_settings(
                plugin_manager, local_disk=str(tmp_path), lmcache_instance_id=instance_id
            )
            opened.append(spec.factory(settings, Events().sink))
        assert [b.area for b in opened] == [tmp_path / "prefill-0", tmp_path / "decode-0"]
    finally:
        for backend in opened:
            backend.close()



def test_closing_twice_releases_the_area_once(make_backend: MakeBackend, disk_dir: Path) -> None:
    backend = make_backend(instance_id="closing")
    backend.close()
    backend.close()
    again = make_backend(instance_id="closing")  # the area is free again, and only once
    assert again.area == backend.area == disk_dir / "closing"
