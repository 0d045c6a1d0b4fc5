"""Turning the index's answer into ``layout_info``: which instance holds how much of a prompt, where.

The index answers per holder (one location of one rank); ``/lookup`` answers per instance. The
``LayoutTable`` keeps, in numpy arrays indexed by holder id, each holder's instance, rank,
model and location position, so a lookup is a handful of array operations over a
(holders x chunks) matrix instead of Python work per holder.

Rules (see docs/controller.md): a rank holds a chunk when any of its locations does; a rank's
prefix is its longest run of held chunks from the start; an instance's prefix is the shortest
of its ranks' (a rank holding nothing counts 0); the location named holds the most chunks of
that prefix, summed over ranks, ties going to the lowest position (fastest).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: one hashing group's index answer and its chunk size: either ``KVIndex.lookup_grid``'s
#: (holder ids, holders x chunks bool matrix) pair, or ``KVIndex.lookup``'s holder -> mask dict
GroupAnswer = tuple[tuple[np.ndarray, np.ndarray] | dict[int, np.ndarray], int]


def as_grid(found: tuple[np.ndarray, np.ndarray] | dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An index answer as (int64 holder ids, 2-D bool masks), whichever form it came in."""
    if not isinstance(found, dict):
        holders, masks = found
        return np.asarray(holders, dtype=np.int64), np.asarray(masks, dtype=bool)
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=bool)
    holders = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
    return holders, np.stack([np.asarray(m, dtype=bool) for m in found.values()])


def _grow(arr: np.ndarray, size: int, fill: int) -> np.ndarray:
    if size <= len(arr):
        return arr
    out = np.full(max(size, 2 * len(arr)), fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Start offsets of the runs of equal values in a sorted array."""
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


class LayoutTable:
    """What lookups need to know about every live holder, as arrays."""

    def __init__(self) -> None:
        self._h_inst = np.full(64, -1, dtype=np.int64)  # -1: not a live holder
        self._h_rank = np.zeros(64, dtype=np.int64)
        self._h_model = np.zeros(64, dtype=np.int64)
        self._h_pos = np.zeros(64, dtype=np.int64)
        self._r_inst = np.zeros(64, dtype=np.int64)
        self._i_world = np.zeros(64, dtype=np.int64)
        self._inst_code: dict[str, int] = {}
        self._inst_name: list[str] = []
        self._i_locations: dict[int, list[str]] = {}
        self._rank_code: dict[tuple[str, int], int] = {}
        self._model_code: dict[str, int] = {}

    def _instance(self, instance_id: str) -> int:
        code = self._inst_code.get(instance_id)
        if code is None:
            code = self._inst_code[instance_id] = len(self._inst_name)
            self._inst_name.append(instance_id)
            self._i_world = _grow(self._i_world, code + 1, 0)
        return code

    def set_holder(self, holder: int, instance_id: str, rank: int, model: str, position: int) -> None:
        inst = self._instance(instance_id)
        rank_code = self._rank_code.get((instance_id, rank))
        if rank_code is None:
            rank_code = self._rank_code[(instance_id, rank)] = len(self._rank_code)
            self._r_inst = _grow(self._r_inst, rank_code + 1, 0)
            self._r_inst[rank_code] = inst
        model_code = self._model_code.setdefault(model, len(self._model_code))
        size = holder + 1
        self._h_inst = _grow(self._h_inst, size, -1)
        self._h_rank = _grow(self._h_rank, size, 0)
        self._h_model = _grow(self._h_model, size, 0)
        self._h_pos = _grow(self._h_pos, size, 0)
        self._h_inst[holder] = inst
        self._h_rank[holder] = rank_code
        self._h_model[holder] = model_code
        self._h_pos[holder] = position

    def drop_holder(self, holder: int) -> None:
        if holder < len(self._h_inst):
            self._h_inst[holder] = -1

    def set_instance(self, instance_id: str, world_size: int, locations: list[str]) -> None:
        """World size and location names by position (0 and [] once the instance is gone)."""
        code = self._instance(instance_id)
        self._i_world[code] = world_size
        self._i_locations[code] = list(locations)

    def layout(
        self,
        answers: list[GroupAnswer],
        n_tokens: int,
        instance_id: str | None = None,
        model: str | None = None,
    ) -> dict[str, list[Any]]:
        """``{instance_id: [location, matched_tokens]}`` from each hashing group's index answer."""
        want_inst = -2 if instance_id is None else self._inst_code.get(instance_id, -3)
        want_model = -2 if model is None else self._model_code.get(model, -3)
        if want_inst == -3 or want_model == -3:
            return {}
        rank_codes: list[np.ndarray] = []
        rank_prefix: list[np.ndarray] = []
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # masks, instance, position, chunk size
        for found, chunk_size in answers:
            holders, masks = as_grid(found)
            if not len(holders):
                continue
            width = masks.shape[1]
            known = holders < len(self._h_inst)
            inst = np.where(known, self._h_inst[np.where(known, holders, 0)], -1)
            keep = inst >= 0
            if want_inst >= 0:
                keep &= inst == want_inst
            if want_model >= 0:
                keep &= self._h_model[np.where(keep, holders, 0)] == want_model
            if not keep.all():
                holders, masks, inst = holders[keep], masks[keep], inst[keep]
            if not len(holders):
                continue
            ranks = self._h_rank[holders]
            order = np.argsort(ranks, kind="stable")
            sorted_ranks = ranks[order]
            starts = _runs(sorted_ranks)
            # a rank holds a chunk when any of its rows does: OR the rows 8 chunks at a time,
            # as u64 words (bools are 0/1 bytes), which is several times cheaper than a
            # reduceat over bools on this small matrix
            ordered = masks.take(order, axis=0)
            if width % 8:
                ordered = np.concatenate([ordered, np.zeros((len(ordered), -width % 8), dtype=bool)], axis=1)
            union = np.bitwise_or.reduceat(ordered.view(np.uint64), starts, axis=0).view(bool)[:, :width]
            chunks = np.where(union.all(axis=1), width, union.argmin(axis=1))
            rank_codes.append(sorted_ranks[starts])
            rank_prefix.append(np.minimum(chunks * chunk_size, n_tokens))
            rows.append((masks, inst, self._h_pos[holders], chunk_size))
        if not rows:
            return {}
        ranks = np.concatenate(rank_codes)
        prefix = np.concatenate(rank_prefix)
        rank_inst = self._r_inst[ranks]
        order = np.argsort(rank_inst, kind="stable")
        sorted_inst = rank_inst[order]
        starts = _runs(sorted_inst)
        insts = sorted_inst[starts]
        inst_prefix = np.minimum.reduceat(prefix[order], starts)
        ranks_seen = np.diff(np.append(starts, len(sorted_inst)))
        inst_prefix[ranks_seen < self._i_world[insts]] = 0  # a rank without any of it
        if not inst_prefix.any():
            return {}
        width = 1 + max(int(pos.max()) for _, _, pos, _ in rows)
        totals = np.zeros(len(insts) * width, dtype=np.float64)
        for masks, inst, pos, chunk_size in rows:
            at = np.searchsorted(insts, inst)
            upto = -(-inst_prefix[at] // chunk_size)
            counts = (masks & (np.arange(masks.shape[1]) < upto[:, None])).sum(axis=1)
            totals += np.bincount(at * width + pos, weights=counts, minlength=len(totals))
        best = totals.reshape(len(insts), width).argmax(axis=1).tolist()  # first max: fastest
        matched = inst_prefix.tolist()
        names = self._inst_name
        locations = self._i_locations
        codes = insts.tolist()
        out: dict[str, list[Any]] = {}
        # longest match first: routers that take the first key of layout_info pick the best
        for i in sorted(range(len(codes)), key=lambda i: -matched[i]):
            if matched[i] > 0:
                out[names[codes[i]]] = [locations[codes[i]][best[i]], matched[i]]
        return out
