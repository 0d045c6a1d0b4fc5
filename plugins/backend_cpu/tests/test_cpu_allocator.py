"""The pool allocator: best fit, alignment, merging of free neighbours."""

from __future__ import annotations

import random

from lmcache_backend_cpu.allocator import ALIGNMENT, PoolAllocator, align_up


def test_allocations_are_aligned_and_rounded_up() -> None:
    alloc = PoolAllocator(4096)
    ranges = [alloc.allocate(n) for n in (1, 63, 64, 65, 200)]
    assert ranges == [(0, 64), (64, 64), (128, 64), (192, 128), (320, 256)]
    assert all(offset % ALIGNMENT == 0 for offset, _ in ranges)
    assert alloc.free_bytes == 4096 - 576


def test_best_fit_picks_the_smallest_run_that_fits() -> None:
    alloc = PoolAllocator(64 * 10)
    a, b, c, d, e = (alloc.allocate(n) for n in (64 * 3, 64, 64 * 2, 64, 64 * 3))
    alloc.free(*a)  # run of 3 units at 0
    alloc.free(*c)  # run of 2 units at 4
    assert alloc.allocate(64 * 2) == c  # the 2-unit run, not the first one
    assert alloc.free_runs() == [(0, 64 * 3)]


def test_freed_neighbours_merge_into_one_run() -> None:
    alloc = PoolAllocator(64 * 4)
    parts = [alloc.allocate(64) for _ in range(4)]
    for i in (0, 2, 3, 1):  # the last free bridges both sides
        alloc.free(*parts[i])
    assert alloc.free_runs() == [(0, 64 * 4)]
    assert alloc.largest_free() == 64 * 4
    assert alloc.allocate(64 * 4) == (0, 64 * 4)


def test_unaligned_capacity_tail_holds_an_exact_fit() -> None:
    alloc = PoolAllocator(100)
    assert alloc.fits(100) and not alloc.fits(101)
    assert alloc.allocate(100) == (0, 100)
    assert alloc.allocate(1) is None
    alloc.free(0, 100)
    assert alloc.allocate(10) == (0, 64)
    assert alloc.allocate(36) == (64, 36)  # the 36-byte tail, shorter than an aligned unit


def test_random_allocations_never_overlap_and_all_bytes_come_back() -> None:
    rng = random.Random(7)
    capacity = 64 * 1000 + 17
    alloc = PoolAllocator(capacity)
    live: list[tuple[int, int]] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            alloc.free(*live.pop(rng.randrange(len(live))))
        else:
            nbytes = rng.randint(1, 64 * 40)
            fits = alloc.fits(nbytes)
            got = alloc.allocate(nbytes)
            assert (got is not None) == fits
            if got is not None:
                assert got[1] >= nbytes and got[0] % ALIGNMENT == 0
                assert got[0] + got[1] <= capacity
                live.append(got)
        spans = sorted(live + alloc.free_runs())
        # live ranges and free runs tile the pool exactly: no overlap, no leak
        cursor = 0
        for offset, size in spans:
            assert offset == cursor
            cursor += size
        assert cursor == capacity
        runs = alloc.free_runs()
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:]))  # merged
    for got in live:
        alloc.free(*got)
    assert alloc.free_runs() == [(0, capacity)]
    assert align_up(capacity) >= capacity
