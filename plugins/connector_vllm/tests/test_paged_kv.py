"""Tokens between vLLM-allocated paged KV caches and canonical chunks, for every layout.

The caches are built by vLLM's own ``allocate_kv_cache`` from an ``AttentionSpec`` (or an
``MLAAttentionSpec``) and a ``KVCacheLayout``, as vLLM's model runner builds them, and filled
with random bits (so every dtype, fp8 included, carries distinct values). The same tests run on
CUDA when a GPU is present; there they are skipped with the reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata

from lmcache_connector_vllm.paged_kv import (
    TOKEN_DIM,
    ChunkLayoutError,
    KVLayoutError,
    PagedKV,
    allocate_paged_cache,
)

LAYERS = 3
HEADS = 2
HEAD = 64
LATENT = 576  # DeepSeek's MLA: kv_lora_rank 512 + rope 64


@dataclass(frozen=True)
class Case:
    """One KV cache as a vLLM backend allocates it."""

    name: str
    layout: KVCacheLayout
    block_size: int  # the scheduler's block
    kernel_block: int | None = None  # the backend's, when it splits scheduler blocks
    mla: bool = False

    def __str__(self) -> str:
        return self.name


# what each backend declares: CPU_ATTN supports LBHNC only (MultipleOf(32) blocks); FLASH_ATTN
# and TRITON_ATTN take the default preference, LBNHC (NHD), or LBHNC (HND) when set; FlashInfer
# LBHNC and the cross-layer BLHNC; ROCm's LHBNC; FlashMLA 64-token blocks with one latent head
CASES = [
    Case("CPU_ATTN LBHNC", KVCacheLayout.LBHNC, 32),
    Case("CPU_ATTN LBHNC block 128", KVCacheLayout.LBHNC, 128),
    Case("FLASH_ATTN NHD (LBNHC)", KVCacheLayout.LBNHC, 16),
    Case("FLASH_ATTN HND (LBHNC)", KVCacheLayout.LBHNC, 16),
    Case("FLASH_ATTN NHD, 64-token blocks in 16-token kernel blocks", KVCacheLayout.LBNHC, 64, 16),
    Case("FLASHINFER HND (LBHNC)", KVCacheLayout.LBHNC, 16),
    Case("FLASHINFER cross-layer (BLHNC)", KVCacheLayout.BLHNC, 16),
    Case("TRITON_ATTN (LBNHC)", KVCacheLayout.LBNHC, 16),
    Case("ROCM_ATTN (LHBNC)", KVCacheLayout.LHBNC, 16),
    Case("cross-layer BLNHC", KVCacheLayout.BLNHC, 16),
    Case("cross-layer BHLNC", KVCacheLayout.BHLNC, 16),
    Case("FLASHMLA (LBNHC, latent)", KVCacheLayout.LBNHC, 64, mla=True),
    Case("MLA cross-layer (BLHNC, latent)", KVCacheLayout.BLHNC, 64, mla=True),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device here: GPU layouts run on CPU only"
        ),
    ),
]


def spec_for(case: Case, dtype: torch.dtype, block_size: int | None = None) -> FullAttentionSpec:
    bs = block_size or case.block_size
    if case.mla:
        return MLAAttentionSpec(block_size=bs, num_kv_heads=1, head_size=LATENT, dtype=dtype)
    return FullAttentionSpec(block_size=bs, num_kv_heads=HEADS, head_size=HEAD, dtype=dtype)


def vllm_cache(
    case: Case, dtype: torch.dtype, device: str, num_blocks: int, seed: int, fill: bool = True
) -> dict[str, torch.Tensor]:
    """``allocate_kv_cache`` output for one group of ``LAYERS`` layers, random bits inside."""
    spec = spec_for(case, dtype)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    block_stride = spec.page_size_bytes * LAYERS if case.layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, num_blocks, LAYERS, case.layout, fixed_strides=(None, block_stride, None, None, None)
    )
    size = spec.page_size_bytes * LAYERS * num_blocks
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size, names, layer_stride, block_stride)],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    kernel = [case.kernel_block] if case.kernel_block else None
    caches = allocate_kv_cache(config, torch.device(device), case.layout, kernel)
    if fill:
        storage = next(iter(caches.values())).untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        gen = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(0, 256, (storage.nbytes(),), dtype=torch.uint8, generator=gen))
    return caches


def translator(case: Case, caches: dict[str, torch.Tensor]) -> PagedKV:
    content = next(iter(caches.values())).shape[-1]
    planes, width = (1, content) if case.mla else (2, HEAD)
    return PagedKV(caches, case.block_size, planes=planes, width=width, describe=case.name)


def reference(case: Case, caches: dict[str, torch.Tensor], kernel_block: int, slots: list[int]) -> torch.Tensor:
    """The canonical chunk read token by token through the logical [B, H, N, C] views."""
    layers = []
    for cache in caches.values():
        rows = [cache[s // kernel_block, :, s % kernel_block, :] for s in slots]  # [H, C] each
        layers.append(torch.stack(rows).reshape(len(slots), -1))  # [n, H * C]
    return torch.stack(layers)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gather_reads_exactly_the_tokens_at_their_slots(case: Case, dtype: torch.dtype, device: str) -> None:
    caches = vllm_cache(case, dtype, device, num_blocks=12, seed=1)
    kv = translator(case, caches)
    rng = random.Random(2)
    block_ids = rng.sample(range(12), 5)
    start, end = 3, 5 * case.block_size - 7  # partial first and last blocks
    chunk = kv.gather(kv.slots(block_ids, start, end))
    assert chunk.shape == kv.format.shape(end - start)
    kernel = case.kernel_block or case.block_size
    slots = [block_ids[t // case.block_size] * case.block_size + t % case.block_size for t in range(start, end)]
    assert torch.equal(bits(chunk), bits(reference(case, caches, kernel, slots)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_chunk_stored_from_one_layout_loads_into_every_other_layout_and_block_size(
    case: Case, dtype: torch.dtype, device: str
) -> None:
    src_caches = vllm_cache(case, dtype, device, num_blocks=12, seed=3)
    src = translator(case, src_caches)
    chunk = src.gather(src.slots([4, 1, 7], 0, 2 * case.block_size + 5))
    for other in CASES:
        if other.mla != case.mla:
            continue
        n = chunk.shape[TOKEN_DIM]
        needed = -(-(n + 9) // other.block_size)
        dst_caches = vllm_cache(other, dtype, device, num_blocks=needed + 2, seed=0, fill=False)
        dst = translator(other, dst_caches)
        blocks = list(range(needed + 1, 1, -1))  # out of order, block 0 and 1 untouched
        slots = dst.slots(blocks, 9, 9 + n)  # starts mid-block
        dst.scatter(chunk, slots)
        assert torch.equal(bits(dst.gather(slots)), bits(chunk)), other.name
        # nothing else was written
        written = sum(int(bits(t).count_nonzero()) for t in dst_caches.values())
        assert written <= chunk.numel() * chunk.element_size(), other.name


@pytest.mark.parametrize("device", DEVICES)
def test_store_then_load_of_arbitrary_token_ranges_through_a_real_engine(
    device: str, tmp_path, plugin_manager
) -> None:
    """Token ranges that start and end anywhere, through a CacheEngine with CPU and disk tiers."""
    settings = load_settings(
        plugin_manager, chunk_size=48, max_local_cpu_size=0.01, local_disk=str(tmp_path / "disk")
    )
    case = CASES[3]  # FlashAttention HND
    src_caches = vllm_cache(case, torch.bfloat16, device, num_blocks=20, seed=5)
    src = translator(case, src_caches)
    tokens = list(range(1000, 1000 + 150))
    src_blocks = list(range(19, 9, -1))
    with CacheEngine(settings, EngineMetadata("m"), plugin_manager) as engine:
        for span in engine.missing_spans(tokens):
            engine.store_chunks([(span, src.gather(src.slots(src_blocks, span.start, span.end)).cpu())])
        assert engine.lookup(tokens) == 150
        other = CASES[2]  # NHD, another block size
        dst = translator(other, vllm_cache(other, torch.bfloat16, device, num_blocks=20, seed=0, fill=False))
        dst_blocks = list(range(10))
        for start, end in [(0, 149), (17, 100), (48, 96), (95, 149)]:
            hold = engine.hold(tokens)
            try:
                for span, view in hold.chunks:
                    lo, hi = max(span.start, start), min(span.end, end)
                    if lo < hi:
                        part = view.tensor.narrow(TOKEN_DIM, lo - span.start, hi - lo)
                        dst.scatter(part, dst.slots(dst_blocks, lo, hi))
            finally:
                hold.release()
            expected = src.gather(src.slots(src_blocks, start, end))
            assert torch.equal(bits(dst.gather(dst.slots(dst_blocks, start, end))), bits(expected))


def test_scatter_refuses_a_chunk_of_another_format() -> None:
    case = CASES[0]
    kv = translator(case, vllm_cache(case, torch.float32, "cpu", num_blocks=4, seed=0))
    slots = kv.slots([0, 1], 0, 40)
    chunk = kv.gather(slots)
    with pytest.raises(ChunkLayoutError, match="needs"):
        kv.scatter(chunk[:2], slots)
    with pytest.raises(ChunkLayoutError):
        kv.scatter(chunk.to(torch.float16), slots)


def test_an_unknown_layout_is_an_error_naming_shape_and_backend() -> None:
    blocks_first = {"layer.0": torch.zeros(2, 8, 16, 4, 64)}  # an older [2, blocks, ...] layout
    with pytest.raises(KVLayoutError, match=r"backend X.*shape \(2, 8, 16, 4, 64\)"):
        PagedKV(blocks_first, 16, planes=2, width=32, describe="backend X")
    wrong_content = {"layer.0": torch.zeros(8, 4, 16, 96)}
    with pytest.raises(KVLayoutError, match="96 content elements"):
        PagedKV(wrong_content, 16, planes=2, width=64, describe="backend X")
    mixed = {"a": torch.zeros(8, 4, 16, 128), "b": torch.zeros(8, 4, 16, 128, dtype=torch.float16)}
    with pytest.raises(KVLayoutError, match="same KV cache shape"):
        PagedKV(mixed, 16, planes=2, width=64)


def test_layers_sharing_one_cache_are_moved_once() -> None:
    shared = torch.randn(6, 2, 16, 128)
    kv = PagedKV({"a": shared, "b": shared}, 16, planes=2, width=64)
    assert kv.format.num_layers == 1 and kv.layer_names == ["a"]


def test_the_torch_only_allocator_matches_vllms() -> None:
    """The benchmark's allocator (no vLLM) lays memory out exactly as vLLM's does."""
    for case in CASES:
        if case.kernel_block:
            continue
        ours = allocate_paged_cache(
            case.layout.name, num_layers=LAYERS, num_blocks=6, heads=1 if case.mla else HEADS,
            block_tokens=case.block_size, content=LATENT if case.mla else 2 * HEAD,
            dtype=torch.bfloat16, fill=False,
        )
        theirs = vllm_cache(case, torch.bfloat16, "cpu", num_blocks=6, seed=0, fill=False)
        for a, b in zip(ours.values(), theirs.values()):
            assert (a.shape, a.stride(), a.storage_offset()) == (b.shape, b.stride(), b.storage_offset())


CPU_DTYPES = [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float16, "auto"), (torch.bfloat16, "fp8")]


def cpu_attn_cache(
    dtype: torch.dtype, kv_cache_dtype: str, block: int, num_blocks: int
) -> tuple[dict[str, torch.Tensor], PagedKV, str]:
    """CPU_ATTN's caches as vLLM allocates them, and a translator over its measured pages."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lmcache_connector_vllm.cpu_attn_page import cpu_attention_page, cpu_attention_writer

    cache_dtype = torch.uint8 if kv_cache_dtype == "fp8" else dtype
    case = Case("CPU_ATTN", KVCacheLayout.LBHNC, block)
    caches = vllm_cache(case, cache_dtype, "cpu", num_blocks, seed=0, fill=False)
    isa = _get_attn_isa(dtype, block, HEAD, kv_cache_dtype)
    first = next(iter(caches.values()))
    page = cpu_attention_page(
        block_tokens=block, heads=HEADS, head_size=HEAD, cache_dtype=cache_dtype,
        compute_dtype=dtype, kv_cache_dtype=kv_cache_dtype, isa=isa,
        token_stride=first.stride(2), head_stride=first.stride(1),
    )
    writer = cpu_attention_writer(isa=isa, kv_cache_dtype=kv_cache_dtype)
    assert (writer is None) == (kv_cache_dtype == "fp8")
    return caches, PagedKV(caches, block, planes=2, width=HEAD, page=page, writer=writer), isa


def cpu_attn_write(caches: dict[str, torch.Tensor], slots: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, isa: str, kv_cache_dtype: str) -> None:
    """What CPU_ATTN does in a forward pass: its own writer puts each token's K and V in place."""
    from vllm import _custom_ops as ops

    for layer, cache in enumerate(caches.values()):
        blocks, heads, block, _ = cache.shape
        key_cache, value_cache = cache.view(blocks, heads, 2 * block, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            keys[layer], values[layer], key_cache, value_cache, slots, isa, 1.0, 1.0, kv_cache_dtype
        )


@pytest.mark.parametrize(("dtype", "kv_cache_dtype"), CPU_DTYPES, ids=str)
@pytest.mark.parametrize("block", [32, 128])
def test_cpu_attention_pages_give_back_exactly_the_tokens_its_writer_stored(
    dtype: torch.dtype, kv_cache_dtype: str, block: int
) -> None:
    caches, kv, isa = cpu_attn_cache(dtype, kv_cache_dtype, block, num_blocks=8)
    gen = torch.Generator().manual_seed(block)
    n = 2 * block + 7
    keys = torch.randn(LAYERS, n, HEADS, HEAD, generator=gen).to(dtype)
    values = torch.randn(LAYERS, n, HEADS, HEAD, generator=gen).to(dtype)
    slots = kv.slots([5, 2, 6], 0, n)
    cpu_attn_write(caches, slots, keys, values, isa, kv_cache_dtype)
    chunk = kv.gather(slots)  # [layers, n, heads * (keys + values)]
    got = chunk.view(LAYERS, n, HEADS, 2, HEAD)
    if kv_cache_dtype == "fp8":  # the writer rounds to fp8 itself: compare within fp8's precision
        decoded = got.view(torch.float8_e4m3fn).float()
        assert torch.allclose(decoded[:, :, :, 0], keys.float(), rtol=0.13, atol=0.02)
        assert torch.allclose(decoded[:, :, :, 1], values.float(), rtol=0.13, atol=0.02)
    else:
        assert torch.equal(got[:, :, :, 0], keys) and torch.equal(got[:, :, :, 1], values)
    # and from CPU_ATTN to a GPU layout (FlashAttention's NHD) and back, tokens mid-block
    other = CASES[2]
    gpu_caches = vllm_cache(other, chunk.dtype, "cpu", num_blocks=24, seed=0, fill=False)
    gpu = translator(other, gpu_caches)
    gpu_slots = gpu.slots(list(range(23, 0, -1)), 11, 11 + n)
    gpu.scatter(chunk, gpu_slots)
    assert torch.equal(bits(gpu.gather(gpu_slots)), bits(chunk))
    back_block = 32 if block == 128 else 128
    needed = -(-(5 + n) // back_block)
    back, kv_back, _ = cpu_attn_cache(dtype, kv_cache_dtype, back_block, num_blocks=needed + 1)
    back_slots = kv_back.slots(list(range(needed, 0, -1)), 5, 5 + n)
    kv_back.scatter(gpu.gather(gpu_slots), back_slots)  # through CPU_ATTN's own writer
    assert torch.equal(bits(kv_back.gather(back_slots)), bits(chunk))
    # the writer and the measured pages agree byte for byte: the same chunk moved element by
    # element into a fresh cache leaves the same memory
    fresh, _, _ = cpu_attn_cache(dtype, kv_cache_dtype, back_block, num_blocks=needed + 1)
    slow = PagedKV(fresh, back_block, planes=2, width=HEAD, page=kv_back._page)
    slow.scatter(chunk, back_slots)
    for written, moved in zip(back.values(), fresh.values()):
        assert torch.equal(bits(written), bits(moved))
