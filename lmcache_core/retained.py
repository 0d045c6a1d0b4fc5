"""A worker's recent event batches, kept as published so a range the controller missed can be
published again (a replay) instead of resending a whole location's inventory."""

from __future__ import annotations

from collections import deque


class RetainedBatches:
    """The latest encoded batches of every location, oldest forgotten first, within a count and
    a byte budget shared by all locations.

    >>> kept = RetainedBatches(max_batches=2, max_bytes=100)
    >>> for seq in (1, 2, 3):
    ...     kept.add("cpu", seq, b"x")
    >>> kept.range("cpu", 1, 3) is None, kept.range("cpu", 2, 3)
    (True, [b'x', b'x'])
    """

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._order: deque[tuple[str, int]] = deque()  # insertion order, for forgetting
        self._by_location: dict[str, dict[int, bytes]] = {}
        self._bytes = 0

    def add(self, location: str, seq: int, payload: bytes) -> None:
        """Keep one batch (a payload larger than the whole budget is not kept)."""
        if len(payload) > self.max_bytes or self.max_batches <= 0:
            self._forget_location(location)  # a hole: older seqs of it could not be replayed whole
            return
        self._by_location.setdefault(location, {})[seq] = payload
        self._order.append((location, seq))
        self._bytes += len(payload)
        while len(self._order) > self.max_batches or self._bytes > self.max_bytes:
            old_location, old_seq = self._order.popleft()
            kept = self._by_location.get(old_location)
            if kept is not None:
                self._bytes -= len(kept.pop(old_seq, b""))

    def _forget_location(self, location: str) -> None:
        kept = self._by_location.pop(location, {})
        self._bytes -= sum(map(len, kept.values()))

    def range(self, location: str, first: int, last: int) -> list[bytes] | None:
        """Batches ``first`` .. ``last`` of ``location``, in order; None when any of them is not
        retained (the caller clamps ``last`` to the latest seq it numbered)."""
        kept = self._by_location.get(location, {})
        out = []
        for seq in range(first, last + 1):
            payload = kept.get(seq)
            if payload is None:
                return None
            out.append(payload)
        return out

    def oldest(self, location: str) -> int | None:
        """The oldest seq retained at ``location`` (None: nothing)."""
        return min(self._by_location.get(location, {}), default=None)
