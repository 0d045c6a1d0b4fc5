"""Both connector roles in this process, driven through vLLM's own data classes.

A real ``VllmConfig`` (of the tiny model), real ``Request``, ``KVCacheBlocks`` and
``SchedulerOutput`` objects, real KV tensors in the CPU backend's shape and a real
``CacheEngine``: the calls vLLM's scheduler and model runner make, in their order, without
starting vLLM's processes (those runs are in test_vllm_end_to_end.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.request import Request

from lmcache_connector_vllm.connector import LMCacheConnectorMetadata, LMCacheConnectorV1

from vllm_helpers import write_config

BS = 32  # vLLM's CPU backend wants multiples of 32
NUM_BLOCKS = 24
LAYERS = 2


def vllm_config(model: Path, kv_role: str = "kv_both") -> VllmConfig:
    """vLLM's config of the tiny model with the connector, under vLLM's default
    ``kv_load_failure_policy`` (a failed load would fail its request)."""
    return VllmConfig(
        model_config=ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="float32"),
        cache_config=CacheConfig(block_size=BS),
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheConnectorV1",
            kv_connector_module_path="lmcache_connector_vllm.connector",
            kv_role=kv_role,
        ),
    )


@dataclass
class Pair:
    scheduler: LMCacheConnectorV1
    worker: LMCacheConnectorV1
    kv: dict[str, torch.Tensor]


@pytest.fixture
def pair(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Pair]:
    config = write_config(tmp_path / "lmcache.yaml", chunk_size=2 * BS, max_local_cpu_size=0.05)
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config))
    vc = vllm_config(tiny_model)
    kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[])
    worker = LMCacheConnectorV1(vc, KVConnectorRole.WORKER, kv_cache_config)
    scheduler = LMCacheConnectorV1(vc, KVConnectorRole.SCHEDULER, kv_cache_config)
    gen = torch.Generator().manual_seed(0)
    # the CPU attention backend's shape: [blocks, kv_heads, block_size, 2 * head_size]
    kv = {
        f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, 2, BS, 128, generator=gen)
        for i in range(LAYERS)
    }
    worker.register_kv_caches(kv)
    yield Pair(scheduler, worker, kv)
    scheduler.shutdown()
    worker.shutdown()


def request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=4), None)


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks((tuple(KVCacheBlock(i) for i in ids),))


def schedule_new(
    pair: Pair, req: Request, block_ids: list[int], num_computed: int
) -> LMCacheConnectorMetadata:
    """One scheduler step admitting ``req``, then its metadata bound on the worker."""
    num_new = len(req.prompt_token_ids) - num_computed
    output = SchedulerOutput(
        scheduled_new_reqs=[
            NewRequestData(
                req_id=req.request_id, prompt_token_ids=req.prompt_token_ids, mm_features=[],
                sampling_params=req.sampling_params, pooling_params=None,
                block_ids=(block_ids,), num_computed_tokens=num_computed, lora_request=None,
            )
        ],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={req.request_id: num_new},
        total_num_scheduled_tokens=num_new,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )
    meta = pair.scheduler.build_connector_meta(output)
    assert isinstance(meta, LMCacheConnectorMetadata)
    pair.worker.bind_connector_metadata(meta)
    return meta


def run_step(pair: Pair) -> set[int]:
    """What the model runner does around a forward pass; returns the failed block ids."""
    pair.worker.start_load_kv(None)  # type: ignore[arg-type]  # the connector reads no context
    pair.worker.wait_for_save()
    pair.worker.clear_connector_metadata()
    return pair.worker.get_block_ids_with_load_errors()


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]


def token_kv(pair: Pair, block_ids: list[int], tokens: range) -> torch.Tensor:
    """The KV of those tokens in every layer, read by slot (where CPU_ATTN's writer puts them)."""
    kv = pair.worker._kv
    assert kv is not None
    return kv.gather(kv.slots(block_ids, tokens.start, tokens.stop))


def store_prompt(pair: Pair, req_id: str, prompt: list[int], block_ids: list[int]) -> None:
    """A request that computes ``prompt`` (a miss) and stores all of it."""
    req = request(req_id, prompt)
    assert pair.scheduler.get_num_new_matched_tokens(req, 0) == (0, False)
    pair.scheduler.update_state_after_alloc(req, blocks(block_ids), 0)
    meta = schedule_new(pair, req, block_ids, 0)
    assert [s.token_ids for s in meta.saves] == [prompt]  # every token, the partial block too
    assert run_step(pair) == set()
    assert pair.worker.flush_saves(10)
    assert pair.scheduler.request_finished(req, block_ids) == (False, None)


def test_prompt_stored_by_one_request_is_loaded_token_by_token_into_another(pair: Pair) -> None:
    prompt = prompt_of(5 * BS + 10)
    store_prompt(pair, "a", prompt, [0, 1, 2, 3, 4, 5])
    engine = pair.worker._engine
    assert engine is not None and engine.lookup(prompt) == len(prompt)

    second = request("b", prompt)
    hit = len(prompt) - 1  # all but the last token, into a partly filled last block
    assert pair.scheduler.get_num_new_matched_tokens(second, 0) == (hit, False)
    target = [10, 11, 12, 13, 14, 15]
    pair.scheduler.update_state_after_alloc(second, blocks(target), hit)
    rest = range(hit, 6 * BS)  # the last token's slot and the rest of its block
    rest_before = token_kv(pair, target, rest)
    meta = schedule_new(pair, second, target, hit)
    assert [(ld.start, ld.end) for ld in meta.loads] == [(0, hit)]
    assert run_step(pair) == set()
    assert torch.equal(token_kv(pair, target, range(hit)), token_kv(pair, [0, 1, 2, 3, 4, 5], range(hit)))
    assert torch.equal(token_kv(pair, target, rest), rest_before)  # the last token is vLLM's


def test_a_clear_between_lookup_and_load_fails_nothing(pair: Pair) -> None:
    prompt = prompt_of(3 * BS + 5, seed=4)
    store_prompt(pair, "a", prompt, [0, 1, 2, 3])
    engine = pair.worker._engine
    assert engine is not None
    req = request("b", prompt)
    hit = len(prompt) - 1
    assert pair.scheduler.get_num_new_matched_tokens(req, 0) == (hit, False)  # holds the chunks
    cleared = engine.clear()  # what a /clear of every location does in the worker
    assert cleared >= len(prompt)  # still counted as removed
    assert engine.lookup(prompt) == 0
    pair.scheduler.update_state_after_alloc(req, blocks([6, 7, 8, 9]), hit)
    schedule_new(pair, req, [6, 7, 8, 9], hit)
    assert run_step(pair) == set()  # loaded from the held chunks: no failed block to recompute
    assert torch.equal(token_kv(pair, [6, 7, 8, 9], range(hit)), token_kv(pair, [0, 1, 2, 3], range(hit)))
    assert pair.worker._holds is not None and len(pair.worker._holds) == 0  # gone once loaded


def test_holds_of_requests_that_never_load_are_released(pair: Pair) -> None:
    prompt = prompt_of(2 * BS, seed=5)
    store_prompt(pair, "a", prompt, [0, 1])
    holds = pair.worker._holds
    assert holds is not None
    waiting = request("w", prompt)
    assert pair.scheduler.get_num_new_matched_tokens(waiting, 0)[0] > 0
    assert len(holds) == 1
    pair.scheduler.get_num_new_matched_tokens(waiting, 0)  # asked again next step: same hold
    assert len(holds) == 1
    pair.scheduler.request_finished(waiting, [])  # aborted before it was scheduled
    meta = schedule_new(pair, request("other", prompt_of(3, seed=9)), [5], 0)
    assert meta.releases == ["w"]
    run_step(pair)
    assert len(holds) == 0


def test_a_hold_past_its_deadline_is_released(pair: Pair) -> None:
    prompt = prompt_of(2 * BS, seed=6)
    store_prompt(pair, "a", prompt, [0, 1])
    holds = pair.worker._holds
    assert holds is not None
    pair.scheduler.get_num_new_matched_tokens(request("lost", prompt), 0)
    assert len(holds) == 1
    assert holds.sweep(now=time.monotonic() + holds.ttl + 1) == 1  # the sweeper's own call
    assert len(holds) == 0 and holds.expired == 1


def test_chunk_removed_after_an_expired_hold_fails_its_blocks_and_the_request_is_not_stored(
    pair: Pair,
) -> None:
    prompt = prompt_of(4 * BS + 1, seed=1)
    store_prompt(pair, "a", prompt, [0, 1, 2, 3, 4])
    second = request("b", prompt)
    assert pair.scheduler.get_num_new_matched_tokens(second, 0) == (4 * BS, False)
    pair.scheduler.update_state_after_alloc(second, blocks([8, 9, 10, 11, 12]), 4 * BS)
    engine, holds = pair.worker._engine, pair.worker._holds
    assert engine is not None and holds is not None
    holds.sweep(now=time.monotonic() + holds.ttl + 1)  # the request waited too long
    # the second chunk (blocks 2 and 3 of the prompt) disappears before the worker loads it
    key = engine.keys.key(engine.hasher.hashes(prompt)[1])
    assert all(backend.remove(key) for backend in engine.backends.values())
    untouched = {name: kv[10:12].clone() for name, kv in pair.kv.items()}
    schedule_new(pair, second, [8, 9, 10, 11, 12], 4 * BS)
    assert run_step(pair) == {10, 11}
    for name, kv in pair.kv.items():
        assert torch.equal(kv[8:10], kv[0:2])  # the first chunk did load
        assert torch.equal(kv[10:12], untouched[name])  # nothing half-written
    # blocks 10 and 11 hold no valid KV, so the request's prompt was not stored again
    assert pair.worker.flush_saves(10)
    assert engine.lookup(prompt) == 2 * BS


def test_stored_chunk_of_another_shape_is_never_loaded(pair: Pair) -> None:
    prompt = prompt_of(2 * BS + 1, seed=2)
    engine = pair.worker._engine
    assert engine is not None
    # a chunk under the same key but with one layer fewer (say, another model's files)
    engine.store(prompt, kv=torch.zeros(LAYERS - 1, len(prompt), 256), token_dim=1)
    req = request("c", prompt)
    assert pair.scheduler.get_num_new_matched_tokens(req, 0) == (2 * BS, False)
    pair.scheduler.update_state_after_alloc(req, blocks([5, 6, 7]), 2 * BS)
    before = {name: kv[5:7].clone() for name, kv in pair.kv.items()}
    schedule_new(pair, req, [5, 6, 7], 2 * BS)
    assert run_step(pair) == {5, 6}
    for name, kv in pair.kv.items():
        assert torch.equal(kv[5:7], before[name])


def test_a_chunk_size_that_is_not_a_multiple_of_the_block_size_works(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "lmcache.yaml", chunk_size=BS + 8, max_local_cpu_size=0.05)
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config))
    kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[])
    vc = vllm_config(tiny_model)
    worker = LMCacheConnectorV1(vc, KVConnectorRole.WORKER, kv_cache_config)
    scheduler = LMCacheConnectorV1(vc, KVConnectorRole.SCHEDULER, kv_cache_config)
    kv = {"l0": torch.randn(NUM_BLOCKS, 2, BS, 128, generator=torch.Generator().manual_seed(1))}
    worker.register_kv_caches(kv)
    pair = Pair(scheduler, worker, kv)
    try:
        prompt = prompt_of(3 * BS + 3, seed=7)
        store_prompt(pair, "a", prompt, [0, 1, 2, 3])
        req = request("b", prompt)
        hit = len(prompt) - 1
        assert scheduler.get_num_new_matched_tokens(req, 0) == (hit, False)
        scheduler.update_state_after_alloc(req, blocks([9, 8, 7, 6]), hit)
        schedule_new(pair, req, [9, 8, 7, 6], hit)
        assert run_step(pair) == set()
        assert torch.equal(token_kv(pair, [9, 8, 7, 6], range(hit)), token_kv(pair, [0, 1, 2, 3], range(hit)))
    finally:
        scheduler.shutdown()
        worker.shutdown()


@pytest.mark.parametrize(("kv_role", "saves", "loads"), [("kv_producer", True, False), ("kv_consumer", False, True)])
def test_producer_only_stores_and_consumer_only_loads(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, kv_role: str, saves: bool, loads: bool
) -> None:
    config = write_config(tmp_path / "lmcache.yaml", chunk_size=2 * BS, max_local_cpu_size=0.05)
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config))
    kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[])
    vc = vllm_config(tiny_model, kv_role)
    worker = LMCacheConnectorV1(vc, KVConnectorRole.WORKER, kv_cache_config)
    scheduler = LMCacheConnectorV1(vc, KVConnectorRole.SCHEDULER, kv_cache_config)
    try:
        worker.register_kv_caches({"l0": torch.zeros(NUM_BLOCKS, 2, BS, 128)})
        pair = Pair(scheduler, worker, {})
        prompt = prompt_of(3 * BS, seed=3)
        assert worker._engine is not None
        worker._engine.store(prompt[: 2 * BS], kv=torch.zeros(1, 2 * BS, 256), token_dim=1)
        req = request("p", prompt)
        matched, _ = scheduler.get_num_new_matched_tokens(req, 0)
        assert (matched > 0) is loads
        scheduler.update_state_after_alloc(req, blocks([0, 1, 2]), matched)
        meta = schedule_new(pair, req, [0, 1, 2], matched)
        assert bool(meta.saves) is saves
    finally:
        scheduler.shutdown()
        worker.shutdown()
