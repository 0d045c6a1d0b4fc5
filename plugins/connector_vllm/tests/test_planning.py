"""The scheduler side's rules: whole blocks only, never the last token, each prompt stored once."""

from __future__ import annotations

from lmcache_connector_vllm.planning import CachedRequest, LoadPlanner, NewRequest

BS = 16


def planner_with_hit(hit: int) -> tuple[LoadPlanner, list[list[int]]]:
    asked: list[list[int]] = []

    def lookup(tokens: list[int]) -> int:
        asked.append(tokens)
        return min(hit, len(tokens))

    return LoadPlanner(BS, lookup), asked


def test_hit_is_capped_before_the_last_prompt_token_at_a_block_boundary() -> None:
    planner, asked = planner_with_hit(10_000)
    assert planner.num_new_matched_tokens("r", list(range(100)), 0) == 96
    assert len(asked[-1]) == 96  # the lookup never covers the last token
    # a prompt of exactly 6 blocks: the 6th block holds the last token, so only 5 load
    assert planner.num_new_matched_tokens("r", list(range(96)), 0) == 80


def test_partial_hits_are_rounded_down_to_whole_blocks() -> None:
    planner, _ = planner_with_hit(40)
    assert planner.num_new_matched_tokens("r", list(range(100)), 0) == 32


def test_blocks_vllm_already_has_are_not_loaded_again() -> None:
    planner, _ = planner_with_hit(64)
    assert planner.num_new_matched_tokens("r", list(range(100)), 32) == 32
    planner.after_alloc("r", list(range(100)), list(range(10, 17)), 32)
    plan = planner.plan([NewRequest("r", list(range(100)), list(range(10, 17)), 64, 36)], [])
    (load,) = plan.loads
    assert (load.start, load.end) == (32, 64)
    assert load.token_ids == list(range(64))
    assert load.block_ids == list(range(10, 17))


def test_no_lookup_when_vllm_already_has_every_loadable_block() -> None:
    planner, asked = planner_with_hit(10_000)
    assert planner.num_new_matched_tokens("r", list(range(100)), 96) == 0
    assert planner.num_new_matched_tokens("r", [5], 0) == 0
    assert planner.num_new_matched_tokens("r", None, 0) == 0
    assert asked == []


def test_prompt_is_stored_once_when_its_prefill_completes() -> None:
    planner, _ = planner_with_hit(0)
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
    planner, _ = planner_with_hit(64)
    prompt = list(range(100))
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
    planner, _ = planner_with_hit(64)
    planner.num_new_matched_tokens("r", list(range(100)), 0)
    planner.after_alloc("r", list(range(100)), [1, 2, 3, 4], 64)
    assert planner.plan([], []).loads == []
    assert planner.plan([NewRequest("r", list(range(100)), [1, 2, 3, 4], 64, 36)], []).loads == []


def test_finished_request_is_forgotten() -> None:
    planner, _ = planner_with_hit(0)
    planner.plan([NewRequest("r", list(range(40)), [1, 2, 3], 0, 10)], [])
    planner.finished("r")
    assert planner.plan([], [CachedRequest("r", [4], False, 10, 30)]).saves == []
