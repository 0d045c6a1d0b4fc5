"""Capacity, LRU eviction, pinning, held views and fragmentation."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from lmcache_core.storage import ChunkView

from lmcache_backend_cpu import LocalCPUBackend

from cpu_helpers import filled, key

MakeBackend = Callable[[int], LocalCPUBackend]
UNIT = 1024  # bytes of one test chunk; a multiple of the alignment, so units tile the pool


def resident(backend: LocalCPUBackend) -> list[int]:
    return sorted(k.chunk_hash for k, _ in backend.inventory())


def test_least_recently_stored_chunk_is_evicted_first(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    for i in range(3):
        backend.put(key(i), filled(UNIT, i), 1)
    assert backend.put(key(3), filled(UNIT, 3), 1)
    assert resident(backend) == [1, 2, 3]
    assert backend.stats()["evictions"] == 1


def test_get_refreshes_recency(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    for i in range(3):
        backend.put(key(i), filled(UNIT, i), 1)
    backend.get(key(0)).release()  # 0 is now the most recent; 1 the oldest
    assert not backend.contains(key(3))  # contains is no use: 1 stays oldest
    backend.contains(key(1))
    backend.put(key(3), filled(UNIT, 3), 1)
    assert resident(backend) == [0, 2, 3]
    backend.put(key(4), filled(UNIT, 4), 1)
    assert resident(backend) == [0, 3, 4]


def test_chunk_larger_than_capacity_is_refused_without_disturbing_others(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    for i in range(3):
        backend.put(key(i), filled(UNIT, i), 1)
    assert not backend.put(key(9), filled(3 * UNIT + 1, 9), 1)
    assert resident(backend) == [0, 1, 2]
    stats = backend.stats()
    assert (stats["rejected"], stats["evictions"]) == (1, 0)


def test_chunk_of_exactly_the_capacity_fits_an_unaligned_pool(make_backend: MakeBackend) -> None:
    backend = make_backend(1000)
    assert backend.put(key(1), filled(1000, 1), 1)
    assert backend.stats()["used_bytes"] == 1000


def test_pinned_chunks_are_never_evicted(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    for i in range(3):
        backend.put(key(i), filled(UNIT, i), 1)
    assert backend.pin(key(0)) and backend.pin(key(1))
    for i in range(3, 8):
        assert backend.put(key(i), filled(UNIT, i), 1)
        assert resident(backend) == [0, 1, i]
    with backend.get(key(0)) as view:
        assert torch.equal(view.tensor, filled(UNIT, 0))


def test_store_is_refused_when_everything_left_is_pinned(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    for i in range(3):
        backend.put(key(i), filled(UNIT, i), 1)
        backend.pin(key(i))
    assert not backend.put(key(3), filled(UNIT, 3), 1)
    assert resident(backend) == [0, 1, 2]
    assert backend.unpin(key(1)) and not backend.unpin(key(1))
    assert backend.put(key(3), filled(UNIT, 3), 1)
    assert resident(backend) == [0, 2, 3]


def test_pin_and_unpin_of_absent_keys_return_false(make_backend: MakeBackend) -> None:
    backend = make_backend(UNIT)
    assert not backend.pin(key(1)) and not backend.unpin(key(1))
    backend.put(key(1), filled(UNIT, 1), 1)
    assert not backend.unpin(key(1))  # present but not pinned


def test_remove_and_clear_remove_pinned_chunks(make_backend: MakeBackend) -> None:
    backend = make_backend(4 * UNIT)
    for i in range(4):
        backend.put(key(i), filled(UNIT, i), 10)
        backend.pin(key(i))
    assert backend.remove(key(0)) == 10
    assert backend.remove(key(0)) == 0
    assert backend.clear() == 30
    stats = backend.stats()
    assert (stats["chunks"], stats["tokens"], stats["used_bytes"], stats["pinned"]) == (0, 0, 0, 0)
    assert backend.put(key(9), filled(4 * UNIT, 9), 1)  # all room came back, in one run


def test_viewed_chunk_survives_eviction_pressure(make_backend: MakeBackend) -> None:
    backend = make_backend(3 * UNIT)
    backend.put(key(0), filled(UNIT, 200), 1)
    view = backend.get(key(0))
    for i in range(1, 20):
        assert backend.put(key(i), filled(UNIT, i), 1)
    assert backend.contains(key(0))
    assert torch.equal(view.tensor, filled(UNIT, 200))
    view.release()
    # released, it is the most recent use: the next two stores evict the others first
    backend.put(key(20), filled(UNIT, 20), 1)
    assert backend.contains(key(0))


def test_removed_chunk_keeps_its_memory_until_the_view_is_released(make_backend: MakeBackend) -> None:
    backend = make_backend(2 * UNIT)
    backend.put(key(0), filled(UNIT, 200), 7)
    view = backend.get(key(0))
    assert backend.remove(key(0)) == 7
    assert not backend.contains(key(0)) and backend.get(key(0)) is None
    # its range is still taken: a store that needs it is refused rather than overwrite the view
    assert not backend.put(key(1), filled(2 * UNIT, 1), 1)
    for i in range(2, 6):
        assert backend.put(key(i), filled(UNIT, i), 1)
    assert torch.equal(view.tensor, filled(UNIT, 200))
    assert backend.stats()["used_bytes"] == 2 * UNIT
    view.release()
    assert backend.stats()["used_bytes"] == UNIT
    assert backend.put(key(1), filled(2 * UNIT, 1), 1)


def test_cleared_chunk_keeps_its_memory_until_the_view_is_released(make_backend: MakeBackend) -> None:
    backend = make_backend(2 * UNIT)
    backend.put(key(0), filled(UNIT, 200), 1)
    backend.put(key(1), filled(UNIT, 201), 1)
    with backend.get(key(1)) as view:
        backend.clear()
        assert backend.stats()["chunks"] == 0
        assert backend.put(key(2), filled(UNIT, 2), 1)
        assert not backend.put(key(3), filled(2 * UNIT, 3), 1)  # the viewed unit is still taken
        assert torch.equal(view.tensor, filled(UNIT, 201))
    assert backend.put(key(3), filled(2 * UNIT, 3), 1)


def test_fragmented_pool_evicts_until_freed_neighbours_merge_into_a_fit(make_backend: MakeBackend) -> None:
    backend = make_backend(4 * UNIT)
    for i in range(4):
        backend.put(key(i), filled(UNIT, i), 1)
    backend.remove(key(1))
    backend.remove(key(3))
    # 2 units free, but apart; evicting the oldest (0) merges with the hole next to it
    assert backend.stats()["largest_free_bytes"] == UNIT
    assert backend.put(key(9), filled(2 * UNIT, 9), 1)
    assert resident(backend) == [2, 9]
    assert backend.stats()["evictions"] == 1


def test_fragmentation_around_a_pinned_chunk_evicts_past_it_to_find_a_run(make_backend: MakeBackend) -> None:
    backend = make_backend(4 * UNIT)
    for i in range(4):
        backend.put(key(i), filled(UNIT, i), 1)
    backend.pin(key(1))  # units: [0][1 pinned][2][3]
    assert backend.put(key(9), filled(2 * UNIT, 9), 1)
    assert resident(backend) == [1, 9]
    with backend.get(key(9)) as view:
        assert torch.equal(view.tensor, filled(2 * UNIT, 9))


def test_store_that_no_eviction_could_fit_evicts_nothing(make_backend: MakeBackend) -> None:
    backend = make_backend(4 * UNIT)
    for i in range(4):
        backend.put(key(i), filled(UNIT, i), 1)
    backend.pin(key(1))  # the longest run eviction could open is 2 units (2 and 3)
    assert not backend.put(key(9), filled(3 * UNIT, 9), 1)
    assert resident(backend) == [0, 1, 2, 3]
    assert backend.stats()["evictions"] == 0


def test_random_workload_never_exceeds_capacity_or_corrupts_a_chunk(make_backend: MakeBackend) -> None:
    rng = random.Random(1234)
    capacity = 64 * UNIT + 100
    backend = make_backend(capacity)
    stored: dict[int, tuple[int, int]] = {}  # key -> (nbytes, byte value)
    held: list[tuple[ChunkView, int, int]] = []  # view, nbytes, byte value
    for step in range(1500):
        op = rng.random()
        k = rng.randrange(60)
        if op < 0.5:
            nbytes = rng.choice([1, 63, 64, 500, UNIT, 3 * UNIT + 7, 9 * UNIT])
            value = rng.randrange(256)
            if backend.put(key(k), filled(nbytes, value), num_tokens=nbytes):
                stored.setdefault(k, (nbytes, value))
        elif op < 0.65:
            view = backend.get(key(k))
            if view is not None:
                nbytes, value = stored[k]
                assert torch.equal(view.tensor, filled(nbytes, value))
                held.append((view, nbytes, value))
        elif op < 0.8 and held:
            view, nbytes, value = held.pop(rng.randrange(len(held)))
            assert torch.equal(view.tensor, filled(nbytes, value))  # never overwritten
            view.release()
        elif op < 0.88:
            backend.remove(key(k))
        elif op < 0.95:
            backend.pin(key(k)) if rng.random() < 0.5 else backend.unpin(key(k))
        elif op < 0.96:
            backend.clear()
        present = {k.chunk_hash for k, _ in backend.inventory()}
        stored = {k: v for k, v in stored.items() if k in present}
        stats = backend.stats()
        assert stats["used_bytes"] <= capacity
        assert stats["used_bytes"] >= sum(n for n, _ in stored.values())
        assert stats["tokens"] == sum(n for n, _ in stored.values())  # tokens == bytes here
        assert stats["views"] == len(held)
    for view, nbytes, value in held:
        assert torch.equal(view.tensor, filled(nbytes, value))
        view.release()
    backend.clear()
    assert backend.stats()["used_bytes"] == 0
    assert backend.stats()["largest_free_bytes"] == capacity


def test_key_stored_again_while_its_removed_copy_is_viewed_gets_its_own_range(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend(4 * UNIT)
    backend.put(key(0), filled(UNIT, 1), 1)
    old = backend.get(key(0))
    backend.remove(key(0))
    assert backend.put(key(0), filled(UNIT, 2), 1)
    with backend.get(key(0)) as new:
        assert new.tensor.data_ptr() != old.tensor.data_ptr()
        old.release()  # freeing the old range leaves the new chunk alone
        assert torch.equal(new.tensor, filled(UNIT, 2))
    assert backend.stats()["used_bytes"] == UNIT and backend.contains(key(0))
