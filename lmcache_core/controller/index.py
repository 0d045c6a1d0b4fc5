"""The controller's KV index: which holder holds which chunk hash.

A *holder* is one ``(instance_id, worker_id, location)`` triple, known by a small integer id.
The index stores one entry per (chunk hash, holder) pair and answers, for a list of query
hashes, which holders hold which of them.

Layout (why it is not a ``dict`` of ``set``s: 10M entries must fit in ~40 bytes each and a
batch must be applied with a handful of numpy calls, not one Python step per entry):

* one open-addressing table with linear probing, three parallel arrays per slot (the mixed
  chunk hash ``u64``, the holder *incarnation* ``u32``, the chunk's tokens ``u32``) plus one
  ``i32`` per 4 slots: 16.5 bytes a slot, kept between 50% and 70% full (24-33 bytes an entry).
  All holders of one hash share a home slot, so they sit in one run of the table;
* slots are never emptied in place: an evicted entry becomes a tombstone. So every entry lies
  between its home and the first empty slot after it, and a new entry simply takes that slot;
* per bucket of 4 home slots, ``end`` records one past the furthest slot any entry homed there
  was pushed to, so a search reads exactly one window per key, cut with ``np.repeat``;
* clearing or removing a holder retires its incarnation (O(1)); the dead entries, like
  tombstones, stay until the table is rebuilt. Incarnation numbers are recycled: one that left
  no entry behind at once, one that did once a rebuild that began after its retirement is
  complete (that rebuild copied none of its entries). So the numbers in use stay bounded by the
  holders plus the dead entries, and the u32 never runs out; should it, a rebuild is forced;
* the rebuild (growing, shrinking or dropping garbage) is incremental: a fresh table is filled
  region by region on later mutating calls, while keys are routed to whichever table holds
  their home range. The home of a key is monotone in its mixed hash (the hash scaled to the
  capacity), so a region's entries land in the new table in one sorted, vectorized placement
  without probing.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from lmcache_core.errors import LMCacheError
from lmcache_core.events import EventKind

__all__ = [
    "HolderInfo",
    "IndexInputError",
    "KVIndex",
    "UnknownHolderError",
    "longest_prefix",
]

# multiplying by an odd constant is a bijection on u64, so mixed keys stay exact; it spreads
# small or structured hashes (tests, other producers) over the whole table
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = 0  # holder value of a never-used slot
_TOMB = 1  # holder value of an evicted entry
_FIRST_INCARNATION = 2
_BUCKET_SHIFT = 2  # 4 home slots share one window end
_MIN_CAPACITY = 1024
_MAX_LOAD = 0.7  # used slots (live + garbage) per home slot before a rebuild starts
_TARGET_LOAD = 0.5  # live entries per home slot right after a rebuild
_GARBAGE_MIN = 1 << 16  # never rebuild just to drop fewer dead entries than this
_TAIL = 64  # slots kept empty at the end of the arrays, so probe windows never run off them
_SPARE_TAIL = 1024  # extra slots past the tail, so a growing run rarely forces a reallocation
_PROBE = 8  # slots read in the second probing round (the first reads the home slot alone)
_MAX_PROBE = 1 << 12  # later rounds double the width up to this
_MIGRATE_MIN_SLOTS = 1 << 16  # old-table slots moved per mutating call during a rebuild
_OLD_LOAD_LIMIT = 0.85  # the table being moved still takes admits for its part, up to this load
_MAX_SHRINK = 12  # a rebuild's new capacity is at least 1/12 of the old table's size
_U32_MAX = (1 << 32) - 1
_MAX_INCARNATION = _U32_MAX  # incarnations are stored as u32
_DENSE_MASK_LIMIT = 1 << 20  # lookups lay out one mask per holder row up to this many cells

ADMIT = int(EventKind.ADMIT)
EVICT = int(EventKind.EVICT)
CLEAR = int(EventKind.CLEAR)


class IndexInputError(LMCacheError, ValueError):
    """A batch handed to the index is malformed (shapes, kinds or values)."""


class UnknownHolderError(LMCacheError, KeyError):
    """A holder id that the index never issued or has removed."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """One registered holder and what it holds now (deduplicated)."""

    holder_id: int
    instance_id: str
    worker_id: int
    location: str
    chunks: int
    tokens: int


def longest_prefix(mask: np.ndarray) -> int:
    """The number of leading ``True`` values in ``mask`` (how many query chunks hit in a row)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return 0
    first_miss = int(np.argmin(mask))
    return int(mask.size) if mask[first_miss] else first_miss


_RAMP_CACHE = np.arange(1 << 16)


def _ramp(n: int) -> np.ndarray:
    """``np.arange(n)``, a view of a cached one when short (lookups make several per call)."""
    return _RAMP_CACHE[:n] if n <= len(_RAMP_CACHE) else np.arange(n)


def _mix(hashes: np.ndarray) -> np.ndarray:
    return hashes * _GOLDEN


class _Table:
    """One linear-probing table of (mixed hash, incarnation, tokens) slots."""

    __slots__ = ("cap", "keys", "hold", "toks", "end", "span", "used", "_scale")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        # home = floor(mixed * cap / 2**64), in float64: monotone in the mixed hash, never cap
        self._scale = np.nextafter(cap / 2.0**64, 0.0)
        size = cap + _TAIL + _SPARE_TAIL
        # np.zeros maps fresh zero pages lazily: allocating a big table costs no time up front
        self.keys = np.zeros(size, dtype=np.uint64)
        self.hold = np.zeros(size, dtype=np.uint32)
        self.toks = np.zeros(size, dtype=np.uint32)
        # per bucket of 4 home slots: one past the last slot any entry homed there occupies
        buckets = (cap >> _BUCKET_SHIFT) + 1
        # (starting at the bucket's own end keeps every window non-empty: no clipping needed)
        self.end = (np.arange(buckets, dtype=np.int32) + 1) << _BUCKET_SHIFT
        self.span = 0  # the largest end - bucket start: no key's entries lie further on
        self.used = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.hold.nbytes + self.toks.nbytes + self.end.nbytes

    def home(self, mixed: np.ndarray) -> np.ndarray:
        """Home slots: the mixed hash scaled to the capacity, so monotone in it."""
        return (mixed.astype(np.float64) * self._scale).astype(np.intp)

    def _grow_tail(self, needed_len: int) -> None:
        # a run reached the end of the arrays (a huge cluster at the top of the hash range)
        extra = needed_len + _TAIL + _SPARE_TAIL - len(self.keys)
        self.keys = np.concatenate([self.keys, np.zeros(extra, dtype=np.uint64)])
        self.hold = np.concatenate([self.hold, np.zeros(extra, dtype=np.uint32)])
        self.toks = np.concatenate([self.toks, np.zeros(extra, dtype=np.uint32)])

    def _note_placed(self, home: np.ndarray, placed: np.ndarray) -> None:
        bucket = home >> _BUCKET_SHIFT
        np.maximum.at(self.end, bucket, (placed + 1).astype(np.int32))
        span = int((placed - (bucket << _BUCKET_SHIFT)).max()) + 1
        if span > self.span:
            self.span = span
            # a full-width lookup window from any home stays inside the arrays
            if self.cap + span + _TAIL > len(self.keys):
                self._grow_tail(self.cap + span + _TAIL)

    def windows(self, mixed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every slot that can hold an entry for each key: (slots, each slot's query row, the
        query key repeated to match). ``take`` is the fast gather."""
        start = self.home(mixed)
        lens = self.end.take(start >> _BUCKET_SHIFT) - start
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        slots = np.repeat(start - ends + lens, lens)
        slots += _ramp(total)
        return slots, np.repeat(_ramp(len(mixed)), lens), np.repeat(mixed, lens)

    def find(self, mixed: np.ndarray, inc: int) -> np.ndarray:
        """The slot holding each (key, ``inc``) pair, or -1; keys must be distinct."""
        found = np.full(len(mixed), -1, dtype=np.intp)
        slots, rows, wanted = self.windows(mixed)
        hit = np.flatnonzero((self.keys.take(slots) == wanted) & (self.hold.take(slots) == inc))
        found[rows.take(hit)] = slots.take(hit)
        return found

    def find_all(self, mixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, incarnation) of every slot whose key matches a query (garbage included)."""
        slots, rows, wanted = self.windows(mixed)
        hit = np.flatnonzero(self.keys.take(slots) == wanted)
        return rows.take(hit), self.hold.take(slots.take(hit))

    def claim(self, mixed: np.ndarray, inc: int, toks: np.ndarray) -> None:
        """Write new (key, ``inc``) pairs, known absent and distinct, into the first free slots."""
        n = len(mixed)
        home = self.home(mixed)
        pos = home.copy()
        placed = np.empty(n, dtype=np.intp)
        active = _ramp(n)
        width = 1  # the home slot alone: free in about (1 - load) of the cases, and cheap to read
        while active.size:
            at = pos.take(active)
            # few rows need a second round; those that do sit in long runs, so look further
            reach = int(at.max()) + width + _TAIL
            if reach >= len(self.keys):
                self._grow_tail(reach)
            free = self.hold.take(at[:, None] + _ramp(width)) == _EMPTY
            has = free.any(axis=1)
            moving = active[~has]
            pos[moving] += width
            cand = active[has]
            slot = at[has] + free[has].argmax(axis=1)
            ordered = np.sort(slot)
            if (ordered[1:] != ordered[:-1]).all():
                won = None  # no two candidates want one slot: all win (the usual case)
                win_rows, win_slots = cand, slot
            else:
                # several want one slot: each writes its row number into the (still unused)
                # token cell, and whoever's number stays there wins the slot
                tag = cand.astype(np.uint32)
                self.toks[slot] = tag
                won = self.toks.take(slot) == tag
                win_rows, win_slots = cand[won], slot[won]
            self.keys[win_slots] = mixed.take(win_rows)
            self.hold[win_slots] = inc
            self.toks[win_slots] = toks.take(win_rows)
            placed[win_rows] = win_slots
            if won is not None:
                lost = ~won
                pos[cand[lost]] = slot[lost]  # now taken: look again from there
                moving = np.concatenate([moving, cand[lost]])
            active = moving
            width = _PROBE if width == 1 else min(width * 2, _MAX_PROBE)
        self.used += n
        self._note_placed(home, placed)

    def first_empty(self, start: int) -> int:
        """The first empty slot at or after ``start`` (the tail guarantees one exists)."""
        step = 1024
        while True:
            window = self.hold[start : start + step]
            empty = np.flatnonzero(window == _EMPTY)
            if empty.size:
                return start + int(empty[0])
            if start + step >= len(self.hold):
                raise AssertionError("table tail is not empty")  # an internal invariant broke
            start += step
            step *= 2

    def place_sorted_run(self, mixed: np.ndarray, incs: np.ndarray, toks: np.ndarray) -> None:
        """Insert entries whose homes are at or above every home already in this table.

        That holds while a rebuild fills this table region by region, so the linear-probing
        layout is one cumulative maximum: position i = max(home i, position i-1 + 1).
        """
        home = self.home(mixed)
        order = np.argsort(home, kind="stable")  # old-table order is nearly sorted already
        home, mixed = home.take(order), mixed.take(order)
        incs, toks = incs.take(order), toks.take(order)
        n = len(home)
        first_free = self.first_empty(int(home[0]))
        ramp = np.arange(n, dtype=np.intp)
        placed = ramp + np.maximum(np.maximum.accumulate(home - ramp), first_free)
        if int(placed[-1]) + _TAIL >= len(self.keys):
            self._grow_tail(int(placed[-1]) + _TAIL)
        self.keys[placed] = mixed
        self.hold[placed] = incs
        self.toks[placed] = toks
        self.used += n
        self._note_placed(home, placed)


def _as_hashes(hashes: object, what: str = "hashes") -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        arr = hashes
    elif isinstance(hashes, np.ndarray):
        if hashes.dtype.kind not in "iu" or (hashes.size and int(hashes.min()) < 0):
            raise IndexInputError(
                f"{what} must be unsigned 64-bit integers, got {hashes.dtype} values"
            )
        arr = hashes.astype(np.uint64)
    else:
        try:
            arr = np.asarray(hashes, dtype=np.uint64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise IndexInputError(f"{what} must be unsigned 64-bit integers: {exc}") from exc
    if arr.ndim != 1:
        raise IndexInputError(f"{what} must be a flat array, got shape {arr.shape}")
    return arr


def _as_tokens(tokens: object, n: int) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or len(arr) != n:
        raise IndexInputError(f"tokens must be a flat array of {n} counts, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
        raise IndexInputError("tokens must be integers in [0, 2**32)")
    return arr.astype(np.uint32, copy=False)


def _last_per_key(keys: np.ndarray) -> np.ndarray | slice:
    """Positions of the last occurrence of each distinct key (all of them when none repeats)."""
    n = len(keys)
    if n <= 1:
        return slice(None)
    # a plain sort is an order of magnitude faster than the stable one unique() needs, and
    # batches rarely repeat a hash: check first, pay for the stable path only when one does
    ordered = np.sort(keys)
    if (ordered[1:] != ordered[:-1]).all():
        return slice(None)
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return n - 1 - first_in_reversed


class KVIndex:
    """Which holder holds which chunk hash; fed by worker event batches, asked by lookups.

    Exact: admitting twice counts once (the later token count wins), evicting an absent entry
    is ignored, and cleared, replaced or removed holders leave no trace in lookups or counts.
    Not thread-safe; every call is short (batches cost in proportion to their size).

    >>> index = KVIndex()
    >>> h = index.holder_id("vllm-0", 0, "cpu")
    >>> index.admit(h, np.array([11, 12], dtype=np.uint64), np.array([256, 256], dtype=np.uint32))
    >>> {k: v.tolist() for k, v in index.lookup(np.array([11, 12, 13], dtype=np.uint64)).items()}
    {0: [True, True, False]}
    """

    def __init__(self, capacity: int = 0, rebuild_step: int = _MIGRATE_MIN_SLOTS) -> None:
        """``capacity``: expected entries, to skip early rebuilds; ``rebuild_step``: the fewest
        old-table slots a mutating call moves while a rebuild runs (smaller: thinner slices)."""
        self._table = _Table(max(_MIN_CAPACITY, int(capacity / _TARGET_LOAD)))
        self._rebuild_step = max(1, int(rebuild_step))
        # while rebuilding: the table being emptied, the first of its slots not moved yet,
        # and how many old slots to move per unit of work
        self._old: _Table | None = None
        self._moved_to = 0
        self._move_rate = 0
        self._live = 0
        self._reserved = 0  # entries announced by reserve() and not admitted yet
        self.rebuilds_started = 0  # grow, shrink and clean-up rebuilds begun so far
        # holder ids are stable; each holds an incarnation that clear_holder replaces, so old
        # entries die in O(1). Each live holder also owns a dense *row* (reused after removal,
        # unlike ids) that lookups build their masks in. Per incarnation: its holder's row
        # (0 once dead; empty slots and tombstones map there too), chunks and tokens.
        self._row_of = np.zeros(64, dtype=np.intp)
        self._row_holder = np.zeros(64, dtype=np.int64)  # row -> holder id; row 0 is unused
        self._rows: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._next_row = 1
        self._chunks = np.zeros(64, dtype=np.int64)
        self._tokens = np.zeros(64, dtype=np.int64)
        self._next_inc = _FIRST_INCARNATION
        self._free_incs = array("I")  # retired, no entry of theirs left in any table
        self._dead_incs = array("I")  # retired with entries left: free after the next rebuild
        self._dead_incs_moving = array("I")  # retired before the running rebuild: free after it
        self._ids: dict[tuple[str, int, str], int] = {}
        self._triples: dict[int, tuple[str, int, str]] = {}
        self._inc: dict[int, int] = {}
        self._next_holder = 0

    # ---- holders -------------------------------------------------------------------------

    def holder_id(self, instance_id: str, worker_id: int, location: str) -> int:
        """The id of this holder, registering it (empty) on first sight."""
        triple = (str(instance_id), int(worker_id), str(location))
        hid = self._ids.get(triple)
        if hid is None:
            hid = self._next_holder
            self._next_holder += 1
            self._ids[triple] = hid
            self._triples[hid] = triple
            self._rows[hid] = row = self._free_rows.pop() if self._free_rows else self._take_row()
            self._row_holder[row] = hid
            self._inc[hid] = self._new_incarnation(hid)
        return hid

    def _take_row(self) -> int:
        row = self._next_row
        self._next_row += 1
        if row >= len(self._row_holder):
            self._row_holder = np.concatenate([self._row_holder, np.zeros_like(self._row_holder)])
        return row

    def holders(self) -> list[HolderInfo]:
        """Every registered holder with its current chunk and token counts."""
        out = []
        for hid, (instance_id, worker_id, location) in self._triples.items():
            inc = self._inc[hid]
            out.append(
                HolderInfo(
                    hid,
                    instance_id,
                    worker_id,
                    location,
                    int(self._chunks[inc]),
                    int(self._tokens[inc]),
                )
            )
        return out

    def holder_stats(self, holder: int) -> tuple[int, int]:
        """(chunks, tokens) the holder holds now, exact and deduplicated."""
        inc = self._current(holder)
        return int(self._chunks[inc]), int(self._tokens[inc])

    def _current(self, holder: int) -> int:
        try:
            return self._inc[holder]
        except (KeyError, TypeError):
            raise UnknownHolderError(
                f"unknown holder id {holder!r}; it was never registered or has been removed"
            ) from None

    def _new_incarnation(self, holder: int) -> int:
        if not self._free_incs and self._next_inc > _MAX_INCARNATION:
            self._collect_incarnations()
        if self._free_incs:
            inc = self._free_incs.pop()
        else:
            inc = self._next_inc
            self._next_inc += 1
            if inc > _MAX_INCARNATION:
                raise LMCacheError("the index ran out of holder incarnations (2**32 in use)")
            if inc >= len(self._row_of):
                self._row_of = np.concatenate([self._row_of, np.zeros_like(self._row_of)])
                self._chunks = np.concatenate([self._chunks, np.zeros_like(self._chunks)])
                self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
        self._row_of[inc] = self._rows[holder]
        return inc

    def _collect_incarnations(self) -> None:
        """Every number is taken: a full rebuild drops the dead entries, freeing their numbers."""
        self.settle()
        if not self._free_incs and self._dead_incs:
            self._start_rebuild(self._table.cap, 0)  # same room: a batch may be half applied
            self.settle()

    def _retire(self, inc: int) -> int:
        """Kill an incarnation in O(1); returns the tokens it held."""
        tokens = int(self._tokens[inc])
        chunks = int(self._chunks[inc])
        self._live -= chunks
        self._row_of[inc] = 0
        self._chunks[inc] = 0
        self._tokens[inc] = 0
        # no slot names an incarnation without live entries (evicted ones are tombstones)
        (self._dead_incs if chunks else self._free_incs).append(inc)
        return tokens

    @property
    def incarnations_made(self) -> int:
        """How many distinct incarnation numbers were ever handed out (recycled ones count once)."""
        return self._next_inc - _FIRST_INCARNATION

    def clear_holder(self, holder: int) -> int:
        """Forget all the holder holds; it stays registered, empty. Returns the tokens removed."""
        old = self._current(holder)
        self._inc[holder] = self._new_incarnation(holder)
        return self._retire(old)

    def remove_holder(self, holder: int) -> None:
        """Unregister the holder (a dead worker, a gone location); O(1) whatever it holds."""
        inc = self._current(holder)
        del self._inc[holder]
        del self._ids[self._triples.pop(holder)]
        self._retire(inc)
        self._free_rows.append(self._rows.pop(holder))

    # ---- entries -------------------------------------------------------------------------

    def admit(self, holder: int, hashes: np.ndarray, tokens: np.ndarray) -> None:
        """Record that the holder holds these chunks (idempotent per hash and holder)."""
        self._current(holder)
        keys = _as_hashes(hashes)
        toks = _as_tokens(tokens, len(keys))
        keep = _last_per_key(keys)
        self._prepare(len(keys))
        self._admit(self._inc[holder], _mix(keys[keep]), toks[keep])
        self._advance(len(keys))

    def evict(self, holder: int, hashes: np.ndarray) -> None:
        """Record that the holder no longer holds these chunks; absent ones are ignored."""
        inc = self._current(holder)
        keys = np.unique(_as_hashes(hashes))
        self._prepare(0)
        self._evict(inc, _mix(keys))
        self._advance(len(keys))

    def apply(self, holder: int, kinds: np.ndarray, hashes: np.ndarray, tokens: np.ndarray) -> None:
        """Apply an ordered batch of one holder's events: kind 1 admit, 2 evict, 3 clear.

        The outcome is that of applying the events one by one (the hash of a clear is ignored).
        """
        self._current(holder)
        keys = _as_hashes(hashes)
        kinds = np.asarray(kinds)
        if kinds.shape != keys.shape:
            raise IndexInputError(f"kinds has shape {kinds.shape} but hashes has {keys.shape}")
        toks = _as_tokens(tokens, len(keys))
        if kinds.size and not np.isin(kinds, (ADMIT, EVICT, CLEAR)).all():
            bad = sorted({int(k) for k in kinds[~np.isin(kinds, (ADMIT, EVICT, CLEAR))]})
            raise IndexInputError(f"unknown event kinds {bad}; expected 1 admit, 2 evict, 3 clear")
        # clears cut the batch into segments; inside one, only the last event per hash matters
        cuts = np.flatnonzero(kinds == CLEAR)
        self._prepare(len(keys))
        start = 0
        for cut in [*cuts.tolist(), len(keys)]:
            if cut > start:
                segment = slice(start, cut)
                self._apply_segment(self._inc[holder], kinds[segment], keys[segment], toks[segment])
            if cut < len(keys):
                self._retire_and_renew(holder)
            start = cut + 1
        self._advance(len(keys))

    def _apply_segment(
        self, inc: int, kinds: np.ndarray, keys: np.ndarray, toks: np.ndarray
    ) -> None:
        last = _last_per_key(keys)
        kinds, keys, toks = kinds[last], _mix(keys[last]), toks[last]
        admit = kinds == ADMIT
        self._admit(inc, keys[admit], toks[admit])
        evict = ~admit
        self._evict(inc, keys[evict])

    def _retire_and_renew(self, holder: int) -> None:
        old = self._inc[holder]
        self._inc[holder] = self._new_incarnation(holder)
        self._retire(old)

    def replace_holder(self, holder: int, hashes: np.ndarray, tokens: np.ndarray) -> None:
        """Make the holder hold exactly these chunks (a resync snapshot)."""
        self._current(holder)
        keys = _as_hashes(hashes)
        toks = _as_tokens(tokens, len(keys))
        self._retire_and_renew(holder)
        keep = _last_per_key(keys)
        self._prepare(len(keys))
        self._admit(self._inc[holder], _mix(keys[keep]), toks[keep])
        self._advance(len(keys))

    def _parts(self, mixed: np.ndarray) -> list[tuple[_Table, np.ndarray | None]]:
        """Which table each key lives in: [(table, row selector or None for all)]."""
        if self._old is None:
            return [(self._table, None)]
        to_new = self._old.home(mixed) < self._moved_to
        return [(self._table, np.flatnonzero(to_new)), (self._old, np.flatnonzero(~to_new))]

    def _admit(self, inc: int, mixed: np.ndarray, toks: np.ndarray) -> None:
        if not len(mixed):
            return
        # an incarnation without live entries has no slot at all (evicted ones are tombstones,
        # rebuilds move live entries only): everything is new, no need to look (installs)
        fresh = self._chunks[inc] == 0
        for table, sel in self._parts(mixed):
            m, t = (mixed, toks) if sel is None else (mixed[sel], toks[sel])
            if not fresh and len(m):
                slots = table.find(m, inc)
                present = slots >= 0
                if present.any():
                    at = slots[present]
                    new = t[present]
                    self._tokens[inc] += int(new.sum(dtype=np.int64)) - int(
                        table.toks[at].sum(dtype=np.int64)
                    )
                    table.toks[at] = new
                    m, t = m[~present], t[~present]
            if len(m):
                table.claim(m, inc, t)
                self._chunks[inc] += len(m)
                self._tokens[inc] += int(t.sum(dtype=np.int64))
                self._live += len(m)

    def _evict(self, inc: int, mixed: np.ndarray) -> None:
        if not len(mixed):
            return
        for table, sel in self._parts(mixed):
            m = mixed if sel is None else mixed[sel]
            if not len(m):
                continue
            slots = table.find(m, inc)
            at = slots[slots >= 0]
            if at.size:
                table.hold[at] = _TOMB
                self._chunks[inc] -= at.size
                self._tokens[inc] -= int(table.toks[at].sum(dtype=np.int64))
                self._live -= at.size

    # ---- queries -------------------------------------------------------------------------

    def lookup(self, hashes: np.ndarray) -> dict[int, np.ndarray]:
        """For each holder holding any of ``hashes``: a bool mask of which ones it holds."""
        holders, masks = self.lookup_grid(hashes)
        return dict(zip(holders.tolist(), masks))

    def lookup_grid(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``lookup`` as two arrays: the ids of the holders holding any of ``hashes`` (int64,
        ascending by internal row, not by id) and a (holders x hashes) bool matrix of which
        ones each holds. The controller's path: no per-holder Python objects are built."""
        if type(hashes) is np.ndarray and hashes.dtype == np.uint64 and hashes.ndim == 1:
            keys = hashes  # the usual call: skip the checks' function call
        else:
            keys = _as_hashes(hashes)
        n = len(keys)
        mixed = keys * _GOLDEN
        if self._old is None and self._next_row * n <= _DENSE_MASK_LIMIT and n:
            # the common case in as few numpy calls as possible (Table.windows, inlined): every
            # window slot marks one cell of a (holder row, query) grid, and slots of other keys
            # or of dead holders mark holder row 0, which is then dropped
            table = self._table
            start = table.home(mixed)
            lens = table.end.take(start >> _BUCKET_SHIFT)
            lens -= start
            ends = lens.cumsum()
            base = start - ends
            base += lens
            slots = base.repeat(lens)
            slots += _ramp(int(ends[-1]))
            cell = self._row_of.take(table.hold.take(slots))
            cell *= table.keys.take(slots) == mixed.repeat(lens)
            cell *= n
            cell += _ramp(n).repeat(lens)
            grid = np.zeros((self._next_row, n), dtype=bool)
            grid.reshape(-1)[cell] = True
            grid[0] = False
            held = grid.any(axis=1).nonzero()[0]
            return self._row_holder.take(held), grid.take(held, axis=0)
        if self._old is None:
            rows, incs = self._table.find_all(mixed)
        else:
            found = [
                (sel[r], i)
                for table, sel in self._parts(mixed)
                for r, i in [table.find_all(mixed[sel])]
            ]
            rows = np.concatenate([f[0] for f in found])
            incs = np.concatenate([f[1] for f in found])
        owner = self._row_of.take(incs)  # empty slots, tombstones and dead incarnations: row 0
        if self._next_row * n <= _DENSE_MASK_LIMIT:
            owner *= n
            owner += rows
            masks = np.zeros((self._next_row, n), dtype=bool)
            masks.reshape(-1)[owner] = True
            masks[0] = False
            held = np.flatnonzero(masks.any(axis=1))
            return self._row_holder.take(held), masks.take(held, axis=0)
        # a long query: lay the masks out for the holders that hit only
        live = np.flatnonzero(owner)
        owner, rows = owner[live], rows[live]
        held, owner = np.unique(owner, return_inverse=True)
        masks = np.zeros((len(held), n), dtype=bool)
        masks[owner, rows] = True
        return self._row_holder.take(held), masks

    @property
    def rebuilding(self) -> bool:
        """Whether an incremental rebuild (grow, shrink or clean-up) is under way."""
        return self._old is not None

    def num_entries(self) -> int:
        """Live (chunk hash, holder) entries."""
        return self._live

    def memory_bytes(self) -> int:
        """Bytes of the arrays that hold entries and per-holder counts."""
        total = self._table.nbytes + self._row_of.nbytes + self._chunks.nbytes + self._tokens.nbytes
        if self._old is not None:
            total += self._old.nbytes
        return total

    # ---- maintenance ---------------------------------------------------------------------

    def settle(self) -> None:
        """Finish any rebuild in progress now (tests and benchmarks; normal calls amortize it)."""
        while self._old is not None:
            self._move_step(len(self._old.keys))

    def fits(self, incoming: int) -> bool:
        """Whether ``incoming`` new entries fit without starting another rebuild (while one
        runs: in the table being filled)."""
        return self._table.used + incoming <= _MAX_LOAD * self._table.cap

    def reserve(self, incoming: int) -> None:
        """Make room for ``incoming`` more entries in one rebuild when they would not fit, rather
        than the several that admitting them bit by bit starts (a recovery knows what is coming).
        A reservation that never fills is given back by the usual shrink."""
        if self.fits(incoming):
            return
        self.settle()
        if self.fits(incoming):
            return
        self._reserved = incoming
        self._start_rebuild(int((self._live + incoming) / _TARGET_LOAD) + 1, incoming)

    def _prepare(self, incoming: int) -> None:
        """Make room for up to ``incoming`` new entries; start a rebuild when one is due."""
        # a reservation holds off shrinking until as many entries as it was for have come
        self._reserved = max(0, self._reserved - incoming)
        if self._old is not None and (
            not self.fits(incoming) or self._old.used + incoming > _OLD_LOAD_LIMIT * self._old.cap
        ):
            self.settle()  # the move fell behind a burst of admits; rare with a sane batch size
        if self._old is not None:
            return
        table = self._table
        garbage = table.used - self._live
        wanted = max(_MIN_CAPACITY, int((self._live + incoming + self._reserved) / _TARGET_LOAD) + 1)
        if (
            not self.fits(incoming)
            or (garbage >= _GARBAGE_MIN and garbage > table.used // 2)
            or (table.cap > 4 * _MIN_CAPACITY and table.cap > 8 * wanted)
        ):
            # never shrink by more than _MAX_SHRINK at once: the new table must have room for
            # what arrives while the old one is moved, and the move must stay a few slots
            # per unit of work so that no call stalls
            self._start_rebuild(max(wanted, len(table.keys) // _MAX_SHRINK), incoming)

    def _start_rebuild(self, cap: int, incoming: int) -> None:
        """Begin moving the live entries into a fresh table of ``cap`` home slots (a small table
        is moved at once: cheaper than in slices)."""
        table = self._table
        self._old = table
        self._table = _Table(cap)
        self.rebuilds_started += 1
        self._moved_to = 0
        headroom = max(1.0, _MAX_LOAD * cap - self._live - incoming)
        # twice the pace that just fits, so the old table's load barely rises meanwhile
        self._move_rate = 2 * int(np.ceil(len(table.keys) / headroom))
        # the dead so far have entries only in the old table, which this rebuild discards
        self._dead_incs_moving, self._dead_incs = self._dead_incs, array("I")
        if len(table.keys) <= 4 * self._rebuild_step:
            self.settle()

    def _advance(self, work: int) -> None:
        """Move a share of the old table proportional to ``work`` while a rebuild runs."""
        if self._old is not None:
            self._move_step(max(self._rebuild_step, work * self._move_rate))

    def _move_step(self, budget: int) -> None:
        old = self._old
        assert old is not None
        start = self._moved_to
        stop = min(start + budget, len(old.keys))
        if stop < len(old.keys):
            stop = old.first_empty(stop - 1) + 1  # end regions on an empty slot: runs stay whole
        incs = old.hold[start:stop]
        live = np.flatnonzero(self._row_of.take(incs))
        if live.size:
            self._table.place_sorted_run(
                old.keys[start:stop].take(live), incs.take(live), old.toks[start:stop].take(live)
            )
        self._moved_to = stop
        if stop >= len(old.keys):
            self._old = None
            self._free_incs.extend(self._dead_incs_moving)
            self._dead_incs_moving = array("I")
