"""Chunks come back bit-exact, from disk or from the write queue."""

from __future__ import annotations

import threading

import pytest
import torch

from disk_helpers import chunk_files, data_for, key_of, same_bits
from lmcache_backend_disk import LocalDiskBackend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 32, 8, 128), (7,), ()])
def test_round_trip_through_a_file_is_bit_exact(
    backend: LocalDiskBackend, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    data = data_for(3, shape, dtype)
    if data.numel() >= 3:  # special values must survive too
        flat = data.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("-inf"), -0.0
    assert backend.put(key_of(1), data, num_tokens=32)
    assert backend.flush(timeout=30)

    with backend.get(key_of(1)) as view:
        assert view.num_tokens == 32
        assert view.tensor.data_ptr() != data.data_ptr()  # read from the file, not the queue
        assert same_bits(view.tensor, data)


def test_write_behind_then_flush_then_get_reads_the_file(
    backend: LocalDiskBackend, area_dir, events
) -> None:
    done = threading.Event()
    data = data_for(5)
    assert backend.put(key_of(5), data, num_tokens=16, on_done=done.set)
    assert backend.flush(timeout=30)

    assert done.is_set()
    assert [p.name for p in chunk_files(area_dir)] == [key_of(5).to_string() + ".kvchunk"]
    assert events.kinds() == ["ADMIT"] and events.seen[0].num_tokens == 16
    stats = backend.stats()
    assert (stats["written"], stats["chunks"], stats["tokens"], stats["queued"]) == (1, 1, 16, 0)
    assert stats["used_bytes"] == chunk_files(area_dir)[0].stat().st_size
    view = backend.get(key_of(5))
    assert view is not None and same_bits(view.tensor, data)
    view.release()
    assert backend.stats()["hits"] == 1


def test_get_of_an_absent_key_is_a_counted_miss(backend: LocalDiskBackend) -> None:
    assert backend.get(key_of(404)) is None
    assert not backend.contains(key_of(404))
    assert backend.stats()["misses"] == 1


def test_queued_chunk_is_served_until_written_with_no_gap(backend: LocalDiskBackend) -> None:
    """Every get between put and long after the write finds the chunk; at least one get is
    served from the queued tensor itself, whose on_done waits until that view is released."""
    burst = [data_for(i, (256, 1024), torch.float32) for i in range(12)]  # 1 MiB each, fsync on
    done = {i: threading.Event() for i in range(12)}
    for i, data in enumerate(burst):
        assert backend.put(key_of(i), data, 16, on_done=done[i].set)
        assert backend.contains(key_of(i))

    held = []
    for i in reversed(range(12)):  # the last ones put are the likeliest still queued
        view = backend.get(key_of(i))
        assert view is not None, f"chunk {i} vanished between put and write"
        assert same_bits(view.tensor, burst[i])
        if view.tensor.data_ptr() == burst[i].data_ptr():
            held.append((i, view))
        else:
            view.release()
    assert held, "no get was served from the write queue"

    assert backend.flush(timeout=60)
    for i, view in held:
        assert not done[i].is_set(), "on_done fired while a reader still held the queued tensor"
        view.release()
        assert done[i].is_set()
    assert all(event.is_set() for event in done.values())
    for i, data in enumerate(burst):
        with backend.get(key_of(i)) as view:
            assert same_bits(view.tensor, data)


def test_same_key_put_twice_is_a_no_op(backend: LocalDiskBackend, events) -> None:
    calls = []
    assert backend.put(key_of(1), data_for(1), 16, on_done=lambda: calls.append("first"))
    assert backend.put(key_of(1), data_for(2), 16, on_done=lambda: calls.append("second"))
    assert backend.flush(timeout=30)
    assert sorted(calls) == ["first", "second"]
    assert events.kinds() == ["ADMIT"]
    with backend.get(key_of(1)) as view:
        assert same_bits(view.tensor, data_for(1))


def test_non_contiguous_tensor_is_stored_in_logical_order(backend: LocalDiskBackend) -> None:
    data = data_for(9, (64, 32), torch.float16).t()
    assert not data.is_contiguous()
    assert backend.put(key_of(9), data, 8)
    assert backend.flush(timeout=30)
    with backend.get(key_of(9)) as view:
        assert same_bits(view.tensor, data.contiguous())


def test_key_too_long_for_a_file_name_still_round_trips_and_reindexes(
    make_backend, area_dir
) -> None:
    key = key_of(77, model="org/" + "very-long-model-name-" * 20)
    assert len(key.to_string()) > 255  # longer than most filesystems allow in one name
    backend = make_backend()
    assert backend.put(key, data_for(77), 16)
    assert backend.flush(timeout=30)
    (path,) = chunk_files(area_dir)
    assert len(path.name.encode()) < 255
    backend.close()

    reopened = make_backend()
    assert reopened.inventory() == [(key, 16)]
    with reopened.get(key) as view:
        assert same_bits(view.tensor, data_for(77))
