"""``LayoutTable`` against a plain-Python statement of the lookup rules, on random fleets."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmcache_core.controller.layout import LayoutTable

LOCATIONS = ["LocalCPUBackend", "LocalDiskBackend", "Remote"]


def reference(fleet: dict, held: dict, n_chunks: int, n_tokens: int, cs: int, instance=None, model=None) -> dict:
    """The rules, written the obvious way."""
    out = {}
    for inst, (world, mdl, locs) in fleet.items():
        if (instance is not None and inst != instance) or (model is not None and mdl != model):
            continue
        prefixes = []
        for rank in range(world):
            run = 0
            while run < n_chunks and any(held.get((inst, rank, loc), [False] * n_chunks)[run] for loc in locs):
                run += 1
            prefixes.append(min(run * cs, n_tokens))
        matched = min(prefixes)
        if matched == 0:
            continue
        upto = -(-matched // cs)
        counts = [sum(sum(held.get((inst, r, loc), [False] * n_chunks)[:upto]) for r in range(world)) for loc in locs]
        best = max(range(len(locs)), key=lambda i: (counts[i], -i))
        out[inst] = [locs[best], matched]
    return out


@pytest.mark.parametrize("seed", range(25))
def test_layout_matches_the_rules_on_random_fleets(seed: int) -> None:
    rng = random.Random(seed)
    cs = rng.choice([1, 4, 256])
    n_chunks = rng.randint(1, 12)
    n_tokens = (n_chunks - 1) * cs + rng.randint(1, cs)
    table = LayoutTable()
    fleet: dict = {}
    held: dict = {}
    answer: dict[int, np.ndarray] = {}
    holder = 0
    for i in range(rng.randint(1, 8)):
        inst = f"inst-{i}"
        world = rng.choice([1, 1, 2, 3])
        locs = LOCATIONS[: rng.randint(1, 3)]
        mdl = rng.choice(["m1", "m2"])
        fleet[inst] = (world, mdl, locs)
        table.set_instance(inst, world, locs)
        for rank in range(world):
            if rng.random() < 0.1:
                continue  # a rank that never registered
            for pos, loc in enumerate(locs):
                mask = [rng.random() < 0.8 for _ in range(n_chunks)]
                held[(inst, rank, loc)] = mask
                table.set_holder(holder, inst, rank, mdl, pos)
                if any(mask):
                    answer[holder] = np.array(mask, dtype=bool)
                holder += 1
    # a holder that left: its entries must not count
    table.set_holder(holder, "gone", 0, "m1", 0)
    table.set_instance("gone", 1, ["LocalCPUBackend"])
    table.drop_holder(holder)
    answer[holder] = np.ones(n_chunks, dtype=bool)

    got = table.layout([(answer, cs)], n_tokens)
    assert got == reference(fleet, held, n_chunks, n_tokens, cs)
    # longest match first (ties in registration order): routers take the first key
    expected_order = sorted(reference(fleet, held, n_chunks, n_tokens, cs).items(), key=lambda kv: -kv[1][1])
    assert list(got.items()) == expected_order
    assert table.layout([(answer, cs)], n_tokens, instance_id="inst-0") == reference(
        fleet, held, n_chunks, n_tokens, cs, instance="inst-0"
    )
    assert table.layout([(answer, cs)], n_tokens, model="m2") == reference(
        fleet, held, n_chunks, n_tokens, cs, model="m2"
    )
    assert table.layout([(answer, cs)], n_tokens, instance_id="nobody") == {}
    # the grid form (KVIndex.lookup_grid's), holders in any order, gives the same answer
    order = list(answer)
    rng.shuffle(order)
    grid = (np.array(order, dtype=np.int64), np.stack([answer[h] for h in order]))
    assert table.layout([(grid, cs)], n_tokens) == reference(fleet, held, n_chunks, n_tokens, cs)
    assert table.layout([(grid, cs)], n_tokens, model="m1") == reference(
        fleet, held, n_chunks, n_tokens, cs, model="m1"
    )


def test_layout_ties_go_to_the_fastest_location() -> None:
    table = LayoutTable()
    table.set_instance("a", 1, ["LocalCPUBackend", "LocalDiskBackend"])
    table.set_holder(0, "a", 0, "m", 0)
    table.set_holder(1, "a", 0, "m", 1)
    both = np.array([True, True, False])
    assert table.layout([({1: both, 0: both}, 4)], 12) == {"a": ["LocalCPUBackend", 8]}
    assert table.layout([({1: both}, 4)], 12) == {"a": ["LocalDiskBackend", 8]}


def test_layout_lists_the_longest_match_first() -> None:
    table = LayoutTable()
    for pos, name in enumerate(["short", "long", "middle"]):
        table.set_instance(name, 1, ["LocalCPUBackend"])
        table.set_holder(pos, name, 0, "m", 0)
    answer = {
        0: np.array([True, False, False]),
        1: np.array([True, True, True]),
        2: np.array([True, True, False]),
    }
    assert list(table.layout([(answer, 4)], 12)) == ["long", "middle", "short"]


def test_layout_of_an_empty_grid_credits_nobody() -> None:
    table = LayoutTable()
    table.set_instance("a", 1, ["LocalCPUBackend"])
    table.set_holder(0, "a", 0, "m", 0)
    empty = (np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=bool))
    assert table.layout([(empty, 4)], 12) == {}
