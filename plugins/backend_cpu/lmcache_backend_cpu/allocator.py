"""Best-fit allocation of byte ranges inside one fixed-size memory pool.

The allocator only does bookkeeping (offsets and sizes); it never touches memory. Ranges start
on ``ALIGNMENT``-byte boundaries so any dtype can view them, and freed ranges merge with free
neighbours at once, so free space is always a set of maximal, non-adjacent runs. Not
thread-safe: its owner serialises calls under its own lock.
"""

from __future__ import annotations

import bisect

#: every range starts on a multiple of this (a cache line; enough for any torch dtype)
ALIGNMENT = 64


def align_up(nbytes: int) -> int:
    """``nbytes`` rounded up to the next multiple of ``ALIGNMENT``."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class PoolAllocator:
    """Hands out ``(offset, size)`` ranges of a pool of ``capacity`` bytes, best fit first.

    >>> a = PoolAllocator(256)
    >>> a.allocate(100), a.allocate(10)
    ((0, 128), (128, 64))
    >>> a.free(0, 128); a.largest_free()
    128
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self._size_at: dict[int, int] = {}  # free run start -> its size
        self._start_at_end: dict[int, int] = {}  # free run end -> its start (to merge leftwards)
        self._by_size: list[tuple[int, int]] = []  # (size, start) sorted, for best fit
        self.free_bytes = 0
        if capacity:
            self._add(0, capacity)

    def allocate(self, nbytes: int) -> tuple[int, int] | None:
        """Reserve room for ``nbytes`` (> 0); the range's ``(offset, size)``, or None if no run fits.

        ``size`` is ``nbytes`` rounded up to the alignment, except in a run that ends at the
        pool's end, which may hold the last few bytes of an unaligned capacity.
        """
        if nbytes <= 0:
            raise ValueError(f"allocation size must be > 0 bytes, got {nbytes}")
        want = align_up(nbytes)
        i = bisect.bisect_left(self._by_size, (want, -1))
        if i < len(self._by_size):
            size, start = self._by_size[i]
        else:
            # only the run touching the pool's end may be shorter than an aligned size
            tail_start = self._start_at_end.get(self.capacity)
            if tail_start is None or self.capacity - tail_start < nbytes:
                return None
            start, size = tail_start, self.capacity - tail_start
            want = size
        self._remove(start, size)
        if size > want:
            self._add(start + want, size - want)
        return start, want

    def free(self, offset: int, size: int) -> None:
        """Give back a range ``allocate`` returned, merging it with free neighbours."""
        if size <= 0:
            return
        start, end = offset, offset + size
        left = self._start_at_end.get(start)
        if left is not None:
            self._remove(left, start - left)
            start = left
        right_size = self._size_at.get(end)
        if right_size is not None:
            self._remove(end, right_size)
            end += right_size
        self._add(start, end - start)

    def fits(self, nbytes: int) -> bool:
        """Whether ``allocate(nbytes)`` would succeed now."""
        if self._by_size and self._by_size[-1][0] >= align_up(nbytes):
            return True
        tail_start = self._start_at_end.get(self.capacity)
        return tail_start is not None and self.capacity - tail_start >= nbytes

    def largest_free(self) -> int:
        """Size of the largest free run (0 when full)."""
        return self._by_size[-1][0] if self._by_size else 0

    def free_runs(self) -> list[tuple[int, int]]:
        """Every free run as ``(offset, size)``, by offset (for tests and diagnostics)."""
        return sorted(self._size_at.items())

    def _add(self, start: int, size: int) -> None:
        self._size_at[start] = size
        self._start_at_end[start + size] = start
        bisect.insort(self._by_size, (size, start))
        self.free_bytes += size

    def _remove(self, start: int, size: int) -> None:
        del self._size_at[start]
        del self._start_at_end[start + size]
        i = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[i]
        self.free_bytes -= size
