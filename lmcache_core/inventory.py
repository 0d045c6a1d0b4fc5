"""Inventory snapshots a worker answers ``inventory`` commands from, one page at a time.

A controller that needs a location's whole inventory (it restarted, or it never knew this run)
pulls it in pages: the first request takes a snapshot as of the last batch published there, the
following ones name it. Only the controller that asked receives the pages (they are replies),
and it asks for the next page when it has the previous one, so nothing big is ever in flight
on its behalf. Snapshots are kept until their last page was answered, a few at most (several
controllers may pull at once); one pushed out answers ``no_snapshot`` and the puller starts over.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lmcache_core.errors import LMCacheError
from lmcache_core.wire import InventoryCommand, InventoryPage

#: snapshots kept at once (oldest pushed out first)
MAX_SNAPSHOTS = 8


class SnapshotGone(LMCacheError):
    """A page of a snapshot that is no longer kept was asked for (error kind ``no_snapshot``)."""


@dataclass
class _Snapshot:
    location: str
    seq: int
    hashes: np.ndarray
    tokens: np.ndarray


class InventorySnapshots:
    """Snapshots by id; ``page`` answers one ``InventoryCommand``."""

    def __init__(self, capacity: int = MAX_SNAPSHOTS) -> None:
        self._snapshots: OrderedDict[str, _Snapshot] = OrderedDict()
        self._capacity = capacity

    def take(self, location: str, seq: int, hashes: np.ndarray, tokens: np.ndarray) -> str:
        """Keep a snapshot of ``location`` as of batch ``seq``; its id."""
        snapshot_id = secrets.token_hex(8)
        self._snapshots[snapshot_id] = _Snapshot(
            location, seq, np.ascontiguousarray(hashes, dtype="<u8"), np.ascontiguousarray(tokens, dtype="<u4")
        )
        while len(self._snapshots) > self._capacity:
            self._snapshots.popitem(last=False)
        return snapshot_id

    def page(self, command: InventoryCommand, snapshot_id: str | None = None) -> InventoryPage:
        """The page ``command`` asks for (of ``snapshot_id``, a snapshot just taken, when given);
        ``SnapshotGone`` when its snapshot is no longer kept."""
        snapshot_id = snapshot_id or command.snapshot
        snap = self._snapshots.get(snapshot_id) if snapshot_id is not None else None
        if snap is None or snap.location != command.location:
            raise SnapshotGone(
                f"inventory snapshot {command.snapshot} of '{command.location}' is no longer kept; "
                "ask again without a snapshot"
            )
        end = min(command.offset + command.limit, len(snap.hashes))
        start = min(command.offset, end)
        if end >= len(snap.hashes):
            del self._snapshots[snapshot_id]  # the last page: nobody asks for this one again
        return InventoryPage.build(
            snapshot_id, snap.location, snap.seq, len(snap.hashes), start, snap.hashes[start:end], snap.tokens[start:end]
        )
