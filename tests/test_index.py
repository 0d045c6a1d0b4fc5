"""The controller's KV index: exact semantics, checked against a plain-Python model."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from lmcache_core.controller.index import (
    HolderInfo,
    IndexInputError,
    KVIndex,
    UnknownHolderError,
    longest_prefix,
)
from lmcache_core.errors import LMCacheError
from lmcache_core.keys import TokenHasher

ADMIT, EVICT, CLEAR = 1, 2, 3
GOLDEN = 0x9E3779B97F4A7C15


def u64(values) -> np.ndarray:
    return np.array(list(values), dtype=np.uint64)


def u32(values) -> np.ndarray:
    return np.array(list(values), dtype=np.uint32)


def as_lists(masks: dict[int, np.ndarray]) -> dict[int, list[bool]]:
    return {holder: mask.tolist() for holder, mask in masks.items()}


class ModelIndex:
    """The reference: holder -> {hash: tokens}, updated one event at a time."""

    def __init__(self) -> None:
        self.held: dict[int, dict[int, int]] = {}

    def lookup(self, hashes: list[int]) -> dict[int, list[bool]]:
        out = {}
        for holder, entries in self.held.items():
            mask = [h in entries for h in hashes]
            if any(mask):
                out[holder] = mask
        return out

    def stats(self, holder: int) -> tuple[int, int]:
        entries = self.held[holder]
        return len(entries), sum(entries.values())


def test_lookup_masks_show_which_prefix_each_holder_holds() -> None:
    hasher = TokenHasher(chunk_size=4)
    prompt = hasher.hashes(list(range(40)))  # 10 chunks
    index = KVIndex()
    short = index.holder_id("vllm-a", 0, "cpu")
    long = index.holder_id("vllm-b", 1, "disk")
    index.admit(short, u64(prompt[:3]), u32([4] * 3))
    index.admit(long, u64(prompt[:8]), u32([4] * 8))

    masks = index.lookup(u64(prompt))

    assert set(masks) == {short, long}
    assert longest_prefix(masks[short]) == 3
    assert longest_prefix(masks[long]) == 8
    assert masks[long].dtype == bool and masks[long].shape == (10,)
    assert index.lookup(u64(hasher.hashes(list(range(100, 140))))) == {}


def test_holder_id_is_stable_per_triple_and_holders_lists_counts() -> None:
    index = KVIndex()
    a = index.holder_id("vllm-a", 0, "cpu")
    b = index.holder_id("vllm-a", 0, "disk")
    assert index.holder_id("vllm-a", 0, "cpu") == a != b
    index.admit(b, u64([1, 2, 3]), u32([256, 256, 100]))

    assert index.holders() == [
        HolderInfo(a, "vllm-a", 0, "cpu", 0, 0),
        HolderInfo(b, "vllm-a", 0, "disk", 3, 612),
    ]


def test_admitting_twice_counts_once_and_the_later_token_count_wins() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    index.admit(h, u64([5, 6, 5]), u32([10, 20, 30]))  # a repeat inside one batch too
    index.admit(h, u64([6, 7]), u32([25, 40]))

    assert index.holder_stats(h) == (3, 30 + 25 + 40)
    assert index.num_entries() == 3
    assert as_lists(index.lookup(u64([5, 6, 7, 8]))) == {h: [True, True, True, False]}


def test_evicting_absent_entries_is_ignored() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    other = index.holder_id("i", 1, "cpu")
    index.admit(h, u64([1, 2]), u32([7, 9]))
    index.admit(other, u64([3]), u32([11]))

    index.evict(h, u64([2, 3, 99, 2]))

    assert index.holder_stats(h) == (1, 7)
    assert index.holder_stats(other) == (1, 11)  # the same hash held elsewhere stays
    assert as_lists(index.lookup(u64([1, 2, 3]))) == {h: [True, False, False], other: [False, False, True]}


def test_apply_follows_event_order_including_clears_inside_the_batch() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    index.admit(h, u64([100]), u32([1]))
    kinds = np.array([ADMIT, EVICT, ADMIT, EVICT, ADMIT, CLEAR, ADMIT, ADMIT, EVICT], dtype=np.uint8)
    hashes = u64([1, 1, 1, 2, 3, 0, 4, 5, 5])
    tokens = u32([10, 10, 11, 0, 12, 0, 13, 14, 0])

    index.apply(h, kinds, hashes, tokens)

    # the clear wiped 100, 1 and 3; afterwards 4 was admitted and 5 came and went
    assert index.holder_stats(h) == (1, 13)
    assert as_lists(index.lookup(u64([100, 1, 3, 4, 5]))) == {h: [False, False, False, True, False]}


def test_apply_without_clear_keeps_the_last_event_per_hash() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    index.apply(h, np.array([ADMIT, EVICT, ADMIT], np.uint8), u64([9, 9, 9]), u32([5, 5, 6]))
    assert index.holder_stats(h) == (1, 6)
    index.apply(h, np.array([EVICT, ADMIT, EVICT], np.uint8), u64([9, 9, 9]), u32([0, 1, 0]))
    assert index.holder_stats(h) == (0, 0)
    assert index.lookup(u64([9])) == {}


def test_clear_holder_reports_tokens_removed_and_keeps_the_holder_registered() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    other = index.holder_id("i", 1, "cpu")
    index.admit(h, u64(range(10)), u32([256] * 10))
    index.admit(other, u64([3]), u32([256]))

    assert index.clear_holder(h) == 2560
    assert index.holder_stats(h) == (0, 0)
    assert index.num_entries() == 1
    assert as_lists(index.lookup(u64(range(10)))) == {other: [i == 3 for i in range(10)]}
    index.admit(h, u64([4]), u32([8]))  # still usable, and only the new entry shows
    assert as_lists(index.lookup(u64([3, 4]))) == {other: [True, False], h: [False, True]}


def test_replace_holder_leaves_exactly_the_snapshot() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    index.admit(h, u64([1, 2, 3]), u32([1, 2, 3]))

    index.replace_holder(h, u64([3, 4, 4]), u32([30, 40, 41]))

    assert index.holder_stats(h) == (2, 71)
    assert as_lists(index.lookup(u64([1, 2, 3, 4]))) == {h: [False, False, True, True]}


def test_removed_holder_is_never_credited_and_its_id_is_not_reused() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    keep = index.holder_id("i", 1, "cpu")
    index.admit(h, u64([1, 2]), u32([1, 1]))
    index.admit(keep, u64([2]), u32([1]))

    index.remove_holder(h)

    assert as_lists(index.lookup(u64([1, 2]))) == {keep: [False, True]}
    assert index.num_entries() == 1
    assert [info.holder_id for info in index.holders()] == [keep]
    with pytest.raises(UnknownHolderError, match="unknown holder id"):
        index.holder_stats(h)
    with pytest.raises(LMCacheError):
        index.admit(h, u64([3]), u32([1]))
    again = index.holder_id("i", 0, "cpu")  # the worker came back: a fresh, empty holder
    assert again != h and index.holder_stats(again) == (0, 0)
    assert as_lists(index.lookup(u64([1, 2]))) == {keep: [False, True]}


def test_removing_a_holder_with_a_million_chunks_is_immediate_and_leaves_no_trace() -> None:
    rng = np.random.default_rng(3)
    index = KVIndex(capacity=1_100_000)
    big = index.holder_id("big", 0, "disk")
    small = index.holder_id("small", 0, "cpu")
    hashes = rng.integers(0, 2**64, 1_000_000, dtype=np.uint64, endpoint=False)
    index.replace_holder(big, hashes, np.full(len(hashes), 256, np.uint32))
    index.admit(small, hashes[:10], np.full(10, 256, np.uint32))

    start = time.perf_counter()
    index.remove_holder(big)
    elapsed = time.perf_counter() - start

    assert elapsed < 0.1
    assert as_lists(index.lookup(hashes[:12])) == {small: [True] * 10 + [False] * 2}
    # the clean-up is amortized into later calls, each short, and keeps lookups exact
    for _ in range(40):
        index.admit(small, rng.integers(0, 2**64, 4096, dtype=np.uint64, endpoint=False), np.ones(4096, np.uint32))
    index.settle()
    assert big not in index.lookup(hashes[::1000])
    assert index.num_entries() == 10 + 40 * 4096
    assert index.memory_bytes() / index.num_entries() <= 40


def test_memory_per_entry_stays_under_40_bytes_as_the_index_grows() -> None:
    rng = np.random.default_rng(4)
    index = KVIndex()
    holders = [index.holder_id("i", w, "cpu") for w in range(8)]
    worst = 0.0
    for step in range(120):
        batch = rng.integers(0, 2**64, 4096, dtype=np.uint64, endpoint=False)
        index.admit(holders[step % 8], batch, np.full(4096, 256, np.uint32))
        if not index.rebuilding:
            worst = max(worst, index.memory_bytes() / index.num_entries())
    assert index.num_entries() == 120 * 4096
    assert worst <= 40


def test_reserving_room_makes_one_rebuild_where_admitting_bit_by_bit_makes_many() -> None:
    rng = np.random.default_rng(6)
    batches = [rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False) for _ in range(60)]

    def rebuilds(index: KVIndex, holders: list[int]) -> int:
        started = 0
        for h, batch in zip(holders, batches):
            was = index.rebuilding
            index.admit(h, batch, np.full(len(batch), 256, np.uint32))
            started += index.rebuilding and not was
        return started

    grown = KVIndex(rebuild_step=1024)
    plain = rebuilds(grown, [grown.holder_id(f"i{w}", 0, "cpu") for w in range(60)])
    reserved = KVIndex(rebuild_step=1024)
    holders = [reserved.holder_id(f"i{w}", 0, "cpu") for w in range(60)]
    assert not reserved.fits(300_000)
    reserved.reserve(300_000)
    reserved.settle()
    assert reserved.fits(300_000)
    assert rebuilds(reserved, holders) == 0 < plain
    assert reserved.num_entries() == 300_000
    # exact all the same; and the reservation, once used up, no longer holds off a shrink
    assert as_lists(reserved.lookup(batches[7][:3])) == {holders[7]: [True] * 3}
    full = reserved.memory_bytes()
    for h in holders[1:]:
        reserved.remove_holder(h)
    reserved.admit(holders[0], batches[0][:10], np.full(10, 1, np.uint32))
    reserved.settle()
    assert reserved.memory_bytes() < full / 8


def test_lookups_stay_exact_while_a_rebuild_moves_entries() -> None:
    rng = np.random.default_rng(5)
    index = KVIndex(rebuild_step=64)  # move slowly, so many calls land mid-rebuild
    model = ModelIndex()
    holders = [index.holder_id("i", w, "cpu") for w in range(5)]
    for h in holders:
        model.held[h] = {}
    pool = rng.integers(0, 2**64, 3000, dtype=np.uint64, endpoint=False)
    seen_rebuilding = 0
    for step in range(300):
        h = holders[step % 5]
        batch = rng.choice(pool, 50)
        index.admit(h, batch, np.full(50, 3, np.uint32))
        model.held[h].update(dict.fromkeys(batch.tolist(), 3))
        gone = rng.choice(pool, 10)
        index.evict(h, gone)
        for g in gone.tolist():
            model.held[h].pop(g, None)
        seen_rebuilding += index.rebuilding
        query = rng.choice(pool, 40)
        assert as_lists(index.lookup(query)) == model.lookup(query.tolist()), step
    assert seen_rebuilding > 20
    assert all(index.holder_stats(h) == model.stats(h) for h in holders)


def test_random_mixed_operations_match_a_dict_of_sets_model() -> None:
    rng = random.Random(11)
    index = KVIndex(rebuild_step=128)
    model = ModelIndex()
    # small and structured hashes too: the index must not rely on hashes looking random
    pool = [rng.getrandbits(64) for _ in range(1500)] + list(range(30)) + [2**64 - 1 - i for i in range(10)]
    live: list[int] = []
    for step in range(1500):
        op = rng.random()
        if not live or op < 0.04:
            h = index.holder_id(f"vllm-{rng.randrange(6)}", rng.randrange(2), rng.choice(["cpu", "disk"]))
            if h not in model.held:
                model.held[h] = {}
                live.append(h)
            continue
        h = rng.choice(live)
        held = model.held[h]
        if op < 0.40:
            keys = [rng.choice(pool) for _ in range(rng.randrange(0, 200))]
            toks = [rng.randrange(1, 300) for _ in keys]
            index.admit(h, u64(keys), u32(toks))
            held.update(zip(keys, toks))
        elif op < 0.55:
            keys = [rng.choice(pool) for _ in range(rng.randrange(0, 120))]
            index.evict(h, u64(keys))
            for k in keys:
                held.pop(k, None)
        elif op < 0.82:
            n = rng.randrange(0, 150)
            kinds = [CLEAR if rng.random() < 0.03 else rng.choice([ADMIT, EVICT]) for _ in range(n)]
            keys = [rng.choice(pool) for _ in range(n)]
            toks = [rng.randrange(1, 300) for _ in range(n)]
            index.apply(h, np.array(kinds, np.uint8), u64(keys), u32(toks))
            for kind, k, t in zip(kinds, keys, toks):
                if kind == ADMIT:
                    held[k] = t
                elif kind == EVICT:
                    held.pop(k, None)
                else:
                    held.clear()
        elif op < 0.88:
            assert index.clear_holder(h) == sum(held.values())
            held.clear()
        elif op < 0.95:
            keys = [rng.choice(pool) for _ in range(rng.randrange(0, 200))]
            toks = [rng.randrange(1, 300) for _ in keys]
            index.replace_holder(h, u64(keys), u32(toks))
            model.held[h] = dict(zip(keys, toks))
        elif op < 0.96:
            index.reserve(rng.randrange(0, 6000))  # room announced, maybe never used
        else:
            index.remove_holder(h)
            del model.held[h]
            live.remove(h)
        assert index.num_entries() == sum(len(e) for e in model.held.values()), step
        if step % 5 == 0:
            assert all(index.holder_stats(x) == model.stats(x) for x in live), step
            query = [rng.choice(pool) for _ in range(rng.randrange(1, 48))]
            assert as_lists(index.lookup(u64(query))) == model.lookup(query), step
    assert sorted(info.holder_id for info in index.holders()) == sorted(live)


def test_one_hash_held_by_thousands_of_holders_at_the_top_of_the_hash_range() -> None:
    # the hash whose mixed value is the largest lands on the last home slot, so its run of
    # 3000 holders must grow past the end of the table's arrays
    top = (2**64 - 1) * pow(GOLDEN, -1, 2**64) % 2**64
    index = KVIndex()
    holders = [index.holder_id("i", w, "cpu") for w in range(3000)]
    for h in holders:
        index.admit(h, u64([top, top - 1]), u32([1, 2]))
    for h in holders[::2]:
        index.evict(h, u64([top]))

    masks = index.lookup(u64([top, top - 1, 12345]))

    assert len(masks) == 3000
    assert all(masks[h].tolist() == [i % 2 == 1, True, False] for i, h in enumerate(holders))


def test_lookups_of_many_hashes_match_lookups_of_few() -> None:
    rng = np.random.default_rng(6)
    index = KVIndex()
    holders = [index.holder_id("i", w, "cpu") for w in range(50)]
    hashes = rng.integers(0, 2**64, 30_000, dtype=np.uint64, endpoint=False)
    for i, h in enumerate(holders):
        index.admit(h, hashes[i::7], np.ones(len(hashes[i::7]), np.uint32))

    whole = index.lookup(hashes)  # a long query takes the compact-mask path

    parts = [index.lookup(hashes[i : i + 1000]) for i in range(0, len(hashes), 1000)]
    for h in holders:
        joined = np.concatenate([p.get(h, np.zeros(1000, bool)) for p in parts])
        assert np.array_equal(whole[h], joined)
        assert int(whole[h].sum()) == index.holder_stats(h)[0]


def test_lookup_grid_gives_the_same_answer_as_lookup_as_two_arrays() -> None:
    rng = np.random.default_rng(8)
    index = KVIndex(rebuild_step=64)
    holders = [index.holder_id("i", w, "cpu") for w in range(20)]
    hashes = rng.integers(0, 2**64, 6000, dtype=np.uint64, endpoint=False)
    paths = set()
    for step, h in enumerate(holders * 3):
        index.admit(h, hashes[step::11], np.ones(len(hashes[step::11]), np.uint32))
        for query in (hashes[:32], hashes[step * 7 : step * 7 + 300], hashes, hashes[:0]):
            paths.add((index.rebuilding, len(query)))
            ids, masks = index.lookup_grid(query)
            assert ids.dtype == np.int64 and masks.dtype == bool
            assert masks.shape == (len(ids), len(query))
            assert len(set(ids.tolist())) == len(ids)
            by_dict = index.lookup(query)
            assert sorted(ids.tolist()) == sorted(by_dict)
            for holder, mask in zip(ids.tolist(), masks):
                assert np.array_equal(mask, by_dict[holder]) and mask.any()
    assert {rebuilding for rebuilding, _ in paths} == {False, True}


def test_longest_prefix_counts_leading_hits() -> None:
    assert longest_prefix(np.array([], dtype=bool)) == 0
    assert longest_prefix(np.array([False, True])) == 0
    assert longest_prefix(np.array([True, True, False, True])) == 2
    assert longest_prefix(np.array([True] * 5)) == 5


def test_malformed_batches_and_unknown_holders_raise_index_errors() -> None:
    index = KVIndex()
    h = index.holder_id("i", 0, "cpu")
    with pytest.raises(IndexInputError, match="tokens must be a flat array of 2"):
        index.admit(h, u64([1, 2]), u32([1]))
    with pytest.raises(IndexInputError, match=r"in \[0, 2\*\*32\)"):
        index.admit(h, u64([1]), np.array([-1]))
    with pytest.raises(IndexInputError, match="unknown event kinds \\[7\\]"):
        index.apply(h, np.array([1, 7], np.uint8), u64([1, 2]), u32([1, 1]))
    with pytest.raises(IndexInputError, match="kinds has shape"):
        index.apply(h, np.array([1], np.uint8), u64([1, 2]), u32([1, 1]))
    with pytest.raises(IndexInputError, match="unsigned 64-bit"):
        index.lookup(np.array([-1]))
    with pytest.raises(IndexInputError, match="unsigned 64-bit"):
        index.lookup([-1])
    with pytest.raises(UnknownHolderError, match="unknown holder id 42"):
        index.evict(42, u64([1]))
    assert isinstance(IndexInputError("x"), LMCacheError)
    assert index.num_entries() == 0  # nothing half-applied


def test_incarnations_are_recycled_so_endless_clears_and_registrations_never_run_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    empty = KVIndex()
    h = empty.holder_id("vllm-0", 0, "cpu")
    for _ in range(100_000):  # an empty holder leaves nothing behind: its number is free at once
        empty.clear_holder(h)
    assert empty.incarnations_made <= 2

    # with entries left behind, numbers come back after a rebuild; with only 48 numbers (the
    # u32 of a real index, scaled down) a rebuild is forced whenever they run out
    monkeypatch.setattr("lmcache_core.controller.index._MAX_INCARNATION", 50)
    rng = random.Random(5)
    index = KVIndex(rebuild_step=64)
    model = ModelIndex()
    pool = [rng.getrandbits(64) for _ in range(400)]
    for step in range(3000):
        name = f"vllm-{step % 7}"  # instances come and go: a registration is a new holder
        h = index.holder_id(name, 0, "cpu")
        model.held.setdefault(h, {})
        keys = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        toks = [rng.randrange(1, 300) for _ in keys]
        index.admit(h, u64(keys), u32(toks))
        model.held[h].update(zip(keys, toks))
        if rng.random() < 0.5:
            assert index.clear_holder(h) == sum(model.held[h].values())
            model.held[h].clear()
        if rng.random() < 0.3:
            index.remove_holder(h)
            del model.held[h]
        query = [rng.choice(pool) for _ in range(16)]
        assert as_lists(index.lookup(u64(query))) == model.lookup(query), step
        assert index.num_entries() == sum(len(e) for e in model.held.values()), step
    assert index.incarnations_made <= 49
