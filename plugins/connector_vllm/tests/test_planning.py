"""The scheduler side's rules: token-granular hits, never the last token, every hold released,
each prompt stored once and whole."""

from __future__ import annotations

from collections.abc import Sequence

from lmcache_core.keys import TokenHasher

from lmcache_connector_vllm.planning import CachedRequest, LoadPlanner, NewRequest

BS = 16
CHUNK = 32


class StoredChunks:
    """A holding lookup over chunk hashes, as the worker does it (a chunk matches by its exact tokens)."""

    def __init__(self) -> None:
        self.hasher = TokenHasher(CHUNK)
        self.hashes: set[int] = set()
        self.asked: list[tuple[str, list[int]]] = []

    def store(self, tokens: Sequence[int]) -> None:
        self.hashes.update(self.hasher.hashes(tokens))

    def __call__(self, req_id: str, tokens: list[int]) -> int:
        self.asked.append((req_id, tokens))
        found = 0
        for span in self.hasher.spans(tokens):
            if span.chunk_hash not in self.hashes:
                break
            found = span.end
        return found


def planner_storing(*stored: Sequence[int]) -> tuple[LoadPlanner, StoredChunks]:
    chunks = StoredChunks()
    for tokens in stored:
        chunks.store(tokens)
    return LoadPlanner(BS, chunks), chunks


def test_a_whole_stored_prompt_loads_every_token_but_the_last() -> None:
    for n in (2, 12, 31, 32, 33, 100):
        prompt = list(range(n))
        planner, chunks = planner_storing(prompt)
        assert planner.num_new_matched_tokens("r", prompt, 0) == n - 1, n
        assert chunks.asked == [("r", prompt)]  # asked by the whole prompt, for this request


def test_a_one_token_prompt_loads_nothing() -> None:
    planner, chunks = planner_storing([7])
    assert planner.num_new_matched_tokens("r", [7], 0) == 0
    assert chunks.asked == []


def test_a_partial_hit_counts_every_cached_token_not_whole_blocks() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:70])  # chunks 0..32, 32..64 match; 64..70 is partial
    assert planner.num_new_matched_tokens("r", prompt, 0) == 64
    planner, _ = planner_storing(prompt[:40], prompt[:36])
    assert planner.num_new_matched_tokens("r", prompt, 0) == 32


def test_load_covers_the_hit_from_the_tokens_vllm_has_into_partial_blocks() -> None:
    prompt = list(range(45))
    planner, _ = planner_storing(prompt)
    assert planner.num_new_matched_tokens("r", prompt, 16) == 28  # 44 - 16
    planner.after_alloc("r", prompt, [7, 8, 9], 28)
    plan = planner.plan([NewRequest("r", prompt, [7, 8, 9], 44, 1)], [])
    (load,) = plan.loads
    assert (load.start, load.end) == (16, 44)  # ends inside block 9
    assert load.token_ids == prompt and load.block_ids == [7, 8, 9]
    assert plan.releases == []  # the load consumes the hold


def test_no_lookup_when_vllm_already_has_every_loadable_token() -> None:
    planner, chunks = planner_storing(list(range(100)))
    assert planner.num_new_matched_tokens("r", list(range(100)), 99) == 0
    assert planner.num_new_matched_tokens("r", None, 0) == 0
    assert chunks.asked == []


def test_a_hold_vllm_does_not_use_is_released_in_the_next_step() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt)
    planner.num_new_matched_tokens("a", prompt, 0)
    planner.after_alloc("a", prompt, [], 0)  # vLLM took nothing (its own cache had more)
    planner.num_new_matched_tokens("b", prompt, 0)
    planner.after_alloc("b", prompt, [1, 2, 3, 4, 5, 6, 7], 99)  # accepted, then not scheduled
    planner.num_new_matched_tokens("c", prompt, 0)
    planner.finished("c")  # aborted while waiting
    plan = planner.plan([], [])
    assert plan.loads == [] and sorted(plan.releases) == ["a", "b", "c"]
    assert planner.plan([], []).releases == []  # once each


def test_prompt_is_stored_once_and_whole_when_its_prefill_completes() -> None:
    planner, _ = planner_storing()
    prompt = list(range(100))
    # chunked prefill: 64 tokens, then the remaining 36
    first = planner.plan([NewRequest("r", prompt, [1, 2, 3, 4], 0, 64)], [])
    assert first.saves == []
    second = planner.plan([], [CachedRequest("r", [5, 6, 7], False, 64, 36)])
    (save,) = second.saves
    assert save.token_ids == prompt  # the last, partial block too
    assert save.block_ids == [1, 2, 3, 4, 5, 6, 7]
    third = planner.plan([], [CachedRequest("r", None, False, 100, 1)])
    assert third.saves == []  # decoding does not store again


def test_a_consumer_only_planner_never_saves() -> None:
    chunks = StoredChunks()
    planner = LoadPlanner(BS, chunks, save=False)
    plan = planner.plan([NewRequest("r", list(range(20)), [1, 2], 0, 20)], [])
    assert plan.saves == []


def test_resumed_request_gets_its_new_blocks_and_its_load_again() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:64])
    planner.plan([NewRequest("r", prompt, [1, 2], 0, 20)], [])
    # preempted, then resumed with new blocks and a new hit
    assert planner.num_new_matched_tokens("r", prompt, 0) == 64
    planner.after_alloc("r", prompt, [9, 8, 7, 6, 5, 4, 3], 64)
    plan = planner.plan([], [CachedRequest("r", [9, 8, 7, 6, 5, 4, 3], True, 64, 36)])
    (load,) = plan.loads
    assert load.block_ids == [9, 8, 7, 6, 5, 4, 3]
    (save,) = plan.saves
    assert save.block_ids == [9, 8, 7, 6, 5, 4, 3]


def test_finished_request_is_forgotten() -> None:
    planner, _ = planner_storing()
    planner.plan([NewRequest("r", list(range(40)), [1, 2, 3], 0, 10)], [])
    planner.finished("r")
    assert planner.plan([], [CachedRequest("r", [4], False, 10, 30)]).saves == []
