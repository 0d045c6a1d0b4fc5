"""Copying whole vLLM blocks between vLLM's paged KV tensors and lmcache chunks.

vLLM hands ``register_kv_caches`` one tensor per attention layer whose first dimension is the
block index (on CPU: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, keys and values
packed per head in a backend-specific order). The connector never interprets a block's inside:
it copies whole blocks verbatim, so any backend layout round-trips exactly. A block's KV
depends only on the tokens up to its end, and a block always sits at the same token positions,
so a copied block is valid wherever the same prefix occurs again.

A chunk of ``n`` tokens (``n`` a multiple of the block size) is stored as a tensor
``[num_layers, n, row]``: each block's memory cut into ``block_size`` equal rows, so slicing the
token dimension at block boundaries is slicing whole blocks (the engine's ``token_dim=1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lmcache_core.errors import ConfigError

#: the dimension of a chunk tensor that counts tokens
TOKEN_DIM = 1


class ChunkLayoutError(ValueError):
    """A stored chunk does not fit this vLLM instance's KV layout (never loaded)."""


@dataclass
class PagedKVLayout:
    """The per-layer paged KV tensors of one worker, viewed as ``[blocks, block_size, row]``."""

    layer_names: list[str]
    #: one view per layer: ``[num_blocks, block_size, row]`` over vLLM's own memory
    views: list[torch.Tensor]
    block_size: int

    @classmethod
    def from_kv_caches(
        cls, kv_caches: Mapping[str, torch.Tensor], block_size: int, num_blocks: int
    ) -> "PagedKVLayout":
        """Build views over ``kv_caches`` (layer name -> tensor, in model order).

        ``num_blocks`` is the scheduler's block count; a backend that splits each scheduler
        block into several kernel blocks has ``tensor.shape[0] == k * num_blocks``, and the
        ``k`` kernel blocks of one scheduler block are adjacent.
        """
        if not kv_caches:
            raise ConfigError("vLLM registered no KV cache tensors with the lmcache connector")
        names: list[str] = []
        views: list[torch.Tensor] = []
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for name, tensor in kv_caches.items():
            ident = (tensor.data_ptr(), tuple(tensor.shape))
            if ident in seen:  # layers sharing one KV cache: store it once
                continue
            seen.add(ident)
            views.append(_block_view(name, tensor, block_size, num_blocks))
            names.append(name)
        shapes = {tuple(v.shape[1:]) for v in views}
        dtypes = {v.dtype for v in views}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ConfigError(
                "the lmcache connector needs every attention layer to have the same KV block "
                f"shape and dtype; got shapes {sorted(shapes)} and dtypes {sorted(map(str, dtypes))}"
            )
        return cls(names, views, block_size)

    @property
    def num_layers(self) -> int:
        return len(self.views)

    @property
    def row(self) -> int:
        return int(self.views[0].shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.views[0].dtype

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.num_layers, num_tokens, self.row)

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A new ``[num_layers, len(block_ids) * block_size, row]`` tensor with those blocks."""
        index = torch.as_tensor(list(block_ids), dtype=torch.long)
        out = torch.empty(self.chunk_shape(len(index) * self.block_size), dtype=self.dtype)
        for layer, view in enumerate(self.views):
            torch.index_select(view, 0, index, out=out[layer].view(len(index), self.block_size, -1))
        return out

    def scatter(self, chunk: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Copy ``chunk`` (as made by ``gather``) into the given blocks, in order."""
        expected = self.chunk_shape(len(block_ids) * self.block_size)
        if tuple(chunk.shape) != expected or chunk.dtype != self.dtype:
            raise ChunkLayoutError(
                f"stored chunk has shape {tuple(chunk.shape)} and dtype {chunk.dtype}; this "
                f"vLLM instance needs {expected} and {self.dtype}"
            )
        index = torch.as_tensor(list(block_ids), dtype=torch.long)
        for layer, view in enumerate(self.views):
            view.index_copy_(0, index, chunk[layer].reshape(len(index), self.block_size, -1))


def _block_view(name: str, tensor: torch.Tensor, block_size: int, num_blocks: int) -> torch.Tensor:
    if tensor.shape[0] % num_blocks != 0:
        raise ConfigError(
            f"KV cache of layer '{name}' has {tensor.shape[0]} blocks, not a multiple of the "
            f"scheduler's {num_blocks}; the lmcache connector does not know this layout"
        )
    if not tensor.is_contiguous():
        raise ConfigError(
            f"KV cache of layer '{name}' is not contiguous (strides {tensor.stride()}); the "
            "lmcache connector copies whole blocks and needs each layer's blocks contiguous"
        )
    per_block = tensor.numel() // num_blocks
    if per_block % block_size != 0:
        raise ConfigError(
            f"KV cache of layer '{name}' holds {per_block} elements per block, not divisible "
            f"by the block size {block_size}"
        )
    return tensor.view(num_blocks, block_size, per_block // block_size)
