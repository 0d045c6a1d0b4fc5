"""Whole-block copies between vLLM-shaped paged KV tensors and a real CacheEngine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import ConfigError

from lmcache_connector_vllm.paged_kv import TOKEN_DIM, ChunkLayoutError, PagedKVLayout

BLOCK = 16
NUM_BLOCKS = 32


def cpu_kv_caches(layers: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors shaped like vLLM's CPU backend: [blocks, kv_heads, block_size, 2 * head_size]."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, 2, BLOCK, 64, generator=gen)
        for i in range(layers)
    }


def test_gather_then_scatter_copies_whole_blocks_bit_exactly() -> None:
    src = cpu_kv_caches(seed=1)
    dst = {name: torch.zeros_like(t) for name, t in cpu_kv_caches().items()}
    src_layout = PagedKVLayout.from_kv_caches(src, BLOCK, NUM_BLOCKS)
    dst_layout = PagedKVLayout.from_kv_caches(dst, BLOCK, NUM_BLOCKS)
    chunk = src_layout.gather([5, 2, 9])
    assert chunk.shape == (3, 3 * BLOCK, 2 * 64)
    dst_layout.scatter(chunk, [0, 1, 30])
    for name in src:
        assert torch.equal(dst[name][[0, 1, 30]], src[name][[5, 2, 9]])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (0, 1, 30)]
        assert not dst[name][untouched].any()


def test_scatter_refuses_a_chunk_of_another_layout() -> None:
    layout = PagedKVLayout.from_kv_caches(cpu_kv_caches(), BLOCK, NUM_BLOCKS)
    other = PagedKVLayout.from_kv_caches(cpu_kv_caches(layers=2), BLOCK, NUM_BLOCKS)
    with pytest.raises(ChunkLayoutError, match="needs"):
        layout.scatter(other.gather([0, 1]), [0, 1])
    with pytest.raises(ChunkLayoutError):
        layout.scatter(layout.gather([0, 1]).to(torch.float16), [0, 1])


def test_layers_sharing_one_kv_tensor_are_copied_once() -> None:
    caches = cpu_kv_caches(layers=2)
    caches["model.layers.2.self_attn.attn"] = caches["model.layers.0.self_attn.attn"]
    layout = PagedKVLayout.from_kv_caches(caches, BLOCK, NUM_BLOCKS)
    assert layout.num_layers == 2


def test_kernel_blocks_smaller_than_scheduler_blocks_are_grouped() -> None:
    """A backend may split each scheduler block into k adjacent kernel blocks."""
    caches = {"l0": torch.arange(2 * NUM_BLOCKS * 8 * 4, dtype=torch.float32).view(2 * NUM_BLOCKS, 1, 8, 4)}
    layout = PagedKVLayout.from_kv_caches(caches, BLOCK, NUM_BLOCKS)
    chunk = layout.gather([3])
    assert torch.equal(chunk.flatten(), caches["l0"][6:8].flatten())


def test_unknown_layouts_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="not a multiple"):
        PagedKVLayout.from_kv_caches({"l0": torch.zeros(2, NUM_BLOCKS, BLOCK, 8)}, BLOCK, NUM_BLOCKS)
    with pytest.raises(ConfigError, match="not contiguous"):
        t = torch.zeros(NUM_BLOCKS, BLOCK, 2, 8).transpose(1, 2)
        PagedKVLayout.from_kv_caches({"l0": t}, BLOCK, NUM_BLOCKS)
    with pytest.raises(ConfigError, match="same KV block shape"):
        PagedKVLayout.from_kv_caches(
            {"a": torch.zeros(NUM_BLOCKS, 2, BLOCK, 8), "b": torch.zeros(NUM_BLOCKS, 4, BLOCK, 8)},
            BLOCK,
            NUM_BLOCKS,
        )
    with pytest.raises(ConfigError, match="no KV cache"):
        PagedKVLayout.from_kv_caches({}, BLOCK, NUM_BLOCKS)


def test_blocks_round_trip_through_a_cache_engine_with_cpu_and_disk(tmp_path: Path) -> None:
    """The connector's store (chunk_fn over blocks) and load (sink into blocks), on real tiers."""
    settings = load_settings(
        chunk_size=2 * BLOCK, max_local_cpu_size=0.01, local_disk=str(tmp_path / "disk"),
        max_local_disk_size=0.01,
    )
    src = cpu_kv_caches(seed=7)
    layout = PagedKVLayout.from_kv_caches(src, BLOCK, NUM_BLOCKS)
    tokens = list(range(100, 100 + 5 * BLOCK))  # 5 blocks: chunks of 2, 2 and 1 blocks
    blocks = [4, 8, 15, 16, 23]
    with CacheEngine(settings, EngineMetadata("m", kv_dtype="float32.blk16")) as engine:
        stored = engine.store(
            tokens,
            chunk_fn=lambda s, e: layout.gather(blocks[s // BLOCK : e // BLOCK]),
            token_dim=TOKEN_DIM,
        )
        assert stored == len(tokens)
        assert engine.flush(timeout=10)
        engine.clear("LocalCPUBackend")  # make the load come from disk

        dst = {name: torch.zeros_like(t) for name, t in src.items()}
        dst_layout = PagedKVLayout.from_kv_caches(dst, BLOCK, NUM_BLOCKS)
        target = [1, 2, 3, 4, 5]
        delivered = engine.retrieve(
            tokens,
            lambda span, t: dst_layout.scatter(t, target[span.start // BLOCK : span.end // BLOCK]),
        )
    assert delivered == len(tokens)
    for name in src:
        assert torch.equal(dst[name][target], src[name][blocks])

