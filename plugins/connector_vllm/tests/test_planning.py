"""The scheduler side's rules: whole blocks only, never the last token, each prompt stored once."""

from __future__ import annotations

from collections.abc import Sequence

from lmcache_core.keys import TokenHasher

from lmcache_connector_vllm.planning import CachedRequest, LoadPlanner, NewRequest

BS = 16
CHUNK = 32


class StoredChunks:
    """A lookup over chunk hashes, as the engine does it (a chunk matches by its exact tokens)."""

    def __init__(self) -> None:
        self.hasher = TokenHasher(CHUNK)
        self.hashes: set[int] = set()
        self.asked: list[list[int]] = []

    def store(self, tokens: Sequence[int]) -> None:
        self.hashes.update(self.hasher.hashes(tokens))

    def __call__(self, tokens: list[int]) -> int:
        self.asked.append(tokens)
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
    return LoadPlanner(BS, CHUNK, chunks), chunks


def test_hit_stops_at_the_last_whole_block_before_the_last_prompt_token() -> None:
    prompt = list(range(100))
    planner, chunks = planner_storing(prompt)
    assert planner.num_new_matched_tokens("r", prompt, 0) == 96
    # a prompt of exactly 6 blocks: the 6th block holds the last token, so only 5 load
    planner, _ = planner_storing(prompt[:96])
    assert planner.num_new_matched_tokens("r", prompt[:96], 0) == 80


def test_load_of_a_block_aligned_prompt_retrieves_its_whole_last_chunk() -> None:
    """Stored as 3 full chunks; 80 tokens load, taken from the head of the third chunk."""
    prompt = list(range(96))
    planner, _ = planner_storing(prompt)
    assert planner.num_new_matched_tokens("r", prompt, 0) == 80
    planner.after_alloc("r", prompt, [7, 8, 9, 10, 11, 12], 80)
    (load,) = planner.plan([NewRequest("r", prompt, [7, 8, 9, 10, 11, 12], 80, 16)], []).loads
    assert (load.start, load.end) == (0, 80)
    assert load.token_ids == prompt  # the chunk hashes are those of the whole 96 tokens


def test_same_prompt_again_matches_the_partial_chunk_its_store_left() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:96])  # what a store of this prompt keeps: whole blocks
    assert planner.num_new_matched_tokens("r", prompt, 0) == 96
    planner.after_alloc("r", prompt, list(range(7)), 96)
    (load,) = planner.plan([NewRequest("r", prompt, list(range(7)), 96, 4)], []).loads
    assert load.token_ids == prompt[:96]


def test_partial_hits_are_rounded_down_to_whole_blocks() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:40])  # chunks 0..31 and a 8-token partial 32..40
    assert planner.num_new_matched_tokens("r", prompt, 0) == 32


def test_blocks_vllm_already_has_are_not_loaded_again() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:64])
    assert planner.num_new_matched_tokens("r", prompt, 32) == 32
    planner.after_alloc("r", prompt, list(range(10, 17)), 32)
    plan = planner.plan([NewRequest("r", prompt, list(range(10, 17)), 64, 36)], [])
    (load,) = plan.loads
    assert (load.start, load.end) == (32, 64)
    assert load.token_ids[:64] == prompt[:64]
    assert load.block_ids == list(range(10, 17))


def test_no_lookup_when_vllm_already_has_every_loadable_block() -> None:
    planner, chunks = planner_storing(list(range(100)))
    assert planner.num_new_matched_tokens("r", list(range(100)), 96) == 0
    assert planner.num_new_matched_tokens("r", [5], 0) == 0
    assert planner.num_new_matched_tokens("r", None, 0) == 0
    assert chunks.asked == []


def test_prompt_is_stored_once_when_its_prefill_completes() -> None:
    planner, _ = planner_storing()
    prompt = list(range(100))
    # chunked prefill: 64 tokens, then the remaining 36
    first = planner.plan([NewRequest("r", prompt, [1, 2, 3, 4], 0, 64)], [])
    assert first.saves == []
    second = planner.plan([], [CachedRequest("r", [5, 6, 7], False, 64, 36)])
    (save,) = second.saves
    assert save.token_ids == prompt[:96]  # whole blocks only
    assert save.block_ids == [1, 2, 3, 4, 5, 6]
    third = planner.plan([], [CachedRequest("r", None, False, 100, 1)])
    assert third.saves == []  # decoding does not store again


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
    assert save.block_ids == [9, 8, 7, 6, 5, 4]


def test_accepted_load_of_a_request_not_scheduled_is_dropped() -> None:
    prompt = list(range(100))
    planner, _ = planner_storing(prompt[:64])
    planner.num_new_matched_tokens("r", prompt, 0)
    planner.after_alloc("r", prompt, [1, 2, 3, 4], 64)
    assert planner.plan([], []).loads == []
    assert planner.plan([NewRequest("r", prompt, [1, 2, 3, 4], 64, 36)], []).loads == []


def test_finished_request_is_forgotten() -> None:
    planner, _ = planner_storing()
    planner.plan([NewRequest("r", list(range(40)), [1, 2, 3], 0, 10)], [])
    planner.finished("r")
    assert planner.plan([], [CachedRequest("r", [4], False, 10, 30)]).saves == []
