"""Where vLLM's CPU attention backend (``CPU_ATTN``) keeps each token inside a KV block.

The CPU backend declares its pages as ``[heads, tokens, keys + values]`` but its kernels pack
them their own way: a head's page holds the block's keys, then its values, each in an order
that depends on the instruction set vLLM picked for the layer (``vec``, ``vec16``, ``amx`` with
VNNI pairs, ...). That order is nowhere declared, so it is *measured*: the backend's own cache
writer (``cpu_attn_reshape_and_cache``) stores a block of coded keys and values into a scratch
page, and where each code lands is the token's place. Codes are small integers (exact in every
KV dtype, fp8 included), written in as many passes as the page needs digits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmcache_connector_vllm.paged_kv import KVLayoutError

#: the largest base whose digits every dtype stores exactly (integers up to it are exact)
_EXACT_BASE = {
    torch.float32: 1 << 24,
    torch.float16: 1 << 11,
    torch.bfloat16: 1 << 8,
    torch.float8_e4m3fn: 1 << 4,
    torch.float8_e5m2: 1 << 3,
}
_FP8_BY_NAME = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cpu_attention_page(
    *,
    block_tokens: int,
    heads: int,
    head_size: int,
    cache_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    kv_cache_dtype: str,
    isa: str,
    token_stride: int,
    head_stride: int,
) -> torch.Tensor:
    """Element offsets ``[tokens, heads, 2, head_size]`` of keys and values in one block.

    ``token_stride`` and ``head_stride`` are those of the registered ``[B, H, N, C]`` view, so
    the offsets apply to vLLM's own tensors whatever their block stride.
    """
    from vllm import _custom_ops as ops

    stored = _FP8_BY_NAME.get(kv_cache_dtype, cache_dtype)
    base = _EXACT_BASE.get(stored)
    if base is None:
        raise KVLayoutError(f"cannot measure CPU_ATTN pages of dtype {stored} (isa {isa})")
    n, h, d = block_tokens, heads, head_size
    count = n * h * 2 * d
    ids = torch.arange(count, dtype=torch.long).view(n, h, 2, d)
    code = torch.zeros(count, dtype=torch.long)
    weight = 1
    while weight < count:
        digit = (ids // weight) % base
        page = torch.zeros(1, h, n, 2 * d, dtype=cache_dtype)
        key_cache, value_cache = page.view(1, h, 2 * n, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            digit[:, :, 0].to(compute_dtype).contiguous(),
            digit[:, :, 1].to(compute_dtype).contiguous(),
            key_cache,
            value_cache,
            torch.arange(n, dtype=torch.long),
            isa,
            1.0,
            1.0,
            kv_cache_dtype,
        )
        code += page.view(-1).view(stored).float().round().long() * weight
        weight *= base
    position = torch.full((count,), -1, dtype=torch.long)
    position[code.clamp(0, count - 1)] = torch.arange(count, dtype=torch.long)
    if bool((position < 0).any()) or not torch.equal(position[code], torch.arange(count)):
        raise KVLayoutError(
            f"CPU_ATTN (isa {isa}, {stored}) does not store a block of {n} tokens x {h} heads "
            f"x 2 x {d} as a permutation; the lmcache connector cannot address its tokens"
        )
    # a position in the scratch [1, heads, tokens, 2 * head_size] page -> vLLM's tensor
    head, rest = position // (n * 2 * d), position % (n * 2 * d)
    offsets = head * head_stride + (rest // (2 * d)) * token_stride + rest % (2 * d)
    return offsets.view(n, h, 2, d)


def cpu_attention_writer(
    *, isa: str, kv_cache_dtype: str
) -> Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], None] | None:
    """A ``PagedKV`` writer through CPU_ATTN's own ``cpu_attn_reshape_and_cache``.

    Several times faster than moving single elements into its packed pages, and exact: for
    unquantised caches the writer only permutes bits (``test_paged_kv`` checks it). None for
    fp8 caches, whose writer quantises its input: chunks already hold fp8 bytes.
    """
    if kv_cache_dtype in _FP8_BY_NAME:
        return None
    from vllm import _custom_ops as ops

    def write(tensors: list[torch.Tensor], chunk: torch.Tensor, slots: torch.Tensor) -> None:
        tokens = chunk.shape[1]
        for cache, layer in zip(tensors, chunk):
            blocks, heads, block, content = cache.shape
            key_cache, value_cache = cache.view(blocks, heads, 2 * block, content // 2).chunk(2, dim=2)
            kv = layer.view(tokens, heads, 2, content // 2)  # the writer reads strided K and V
            ops.cpu_attn_reshape_and_cache(
                kv[:, :, 0], kv[:, :, 1],
                key_cache, value_cache, slots, isa, 1.0, 1.0, kv_cache_dtype,
            )

    return write
