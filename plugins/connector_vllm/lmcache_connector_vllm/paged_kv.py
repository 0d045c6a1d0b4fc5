"""Moving tokens between vLLM's paged KV cache and lmcache's canonical chunk format.

vLLM 0.32 hands ``register_kv_caches`` one view per attention layer whose *logical* shape is
``[B, H, N, C]`` whatever the attention backend: kernel blocks, KV heads (head slots), tokens
per kernel block and the per-token content (keys then values, ``head_size + head_size_v``
elements, for attention; the latent vector for MLA, where ``H == 1``). The backend's
``KVCacheLayout`` (``LBHNC`` for the CPU backend and FlashAttention's HND, ``LBNHC`` for
FlashAttention's default NHD, FlashInfer and Triton, ``LHBNC``, the cross-layer ``BLHNC`` ...)
changes only the *strides* of those views, so the strides vLLM hands over are the layout.

The canonical chunk of ``n`` tokens is one contiguous tensor ``[layers, n, heads * content]``:
per token and head its keys then its values (``planes == 2`` of ``width`` = head size each),
or its latent vector for MLA and packed quantised content (``planes == 1``). Token-major, so a
token's whole KV in one layer is one run of memory, as it is in most backends' pages. It names
no block, block size, backend, layout or device, so a chunk stored by one vLLM loads into
another with any of those different. A token's place in vLLM is its *slot*:
``block_id * block_size + offset`` (scheduler blocks; kernel blocks of one scheduler block are
adjacent, so the slot arithmetic is the same).

Every copy is a single ``index_select`` (gather) or ``index_copy_`` (scatter) over the cache's
storage seen as rows of ``g`` elements (the longest run a token's content keeps in the page,
dividing every stride), with a row index built from the strides: one kernel for all layers that share one allocation (vLLM
allocates them all in one), on CPU and on CUDA alike, and bytes are copied as integers, so fp8
and every other dtype round-trip exactly.

This module needs torch only (no vLLM): ``benchmarks/bench_paged_kv.py`` runs it anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

#: the dimension of a chunk tensor that counts tokens
TOKEN_DIM = 1

#: dtypes that move rows as raw bits, widest first; each copy takes the widest that divides a
#: row. CPU's index_select copies integer rows fastest, its index_copy_ costs per element, so a
#: scatter goes as 16-byte elements (a complex128 copy is bitwise: the tests check random bits)
_GATHER_RAW = (torch.int64, torch.int32, torch.int16, torch.uint8)
_SCATTER_RAW = (torch.complex128, *_GATHER_RAW)

#: physical orders of vLLM 0.32's KV cache layouts, over the logical axes [L, B, H, N, C]
LAYOUT_ORDERS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


class KVLayoutError(ValueError):
    """vLLM's KV cache tensors are not in a layout this module can address by token."""


class ChunkLayoutError(ValueError):
    """A stored chunk does not fit this vLLM instance's chunk format (never loaded)."""


@dataclass(frozen=True)
class ChunkFormat:
    """The canonical chunk format of one worker: ``[layers, tokens, heads * planes * width]``."""

    num_layers: int
    planes: int
    heads: int
    width: int
    dtype: torch.dtype

    @property
    def token_elements(self) -> int:
        """Elements of one token in one layer."""
        return self.heads * self.planes * self.width

    def shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.num_layers, num_tokens, self.token_elements)


@dataclass
class _Run:
    """Consecutive layers whose caches live in one storage: one index op moves them all."""

    first: int
    count: int
    rows: torch.Tensor  # the whole storage as [rows, bytes of g elements]
    base: torch.Tensor  # [count]: the row of each layer's first element


class PagedKV:
    """Copies tokens between one worker's paged KV tensors and canonical chunks, by slot.

    >>> kv = PagedKV(kv_caches, block_size=16, planes=2, width=128)   # doctest: +SKIP
    >>> slots = kv.slots(block_ids, 0, 300)                          # doctest: +SKIP
    >>> chunk = kv.gather(slots)          # [layers, 300, heads * 2 * 128]  # doctest: +SKIP
    >>> kv.scatter(chunk, other_slots)                                # doctest: +SKIP

    ``page`` maps a block's ``[tokens, heads, planes, width]`` to element offsets, for backends
    whose pages are not plain strided views; ``writer(tensors, chunk, slots)``, when given,
    writes chunks the backend's own way (it must store exactly what ``gather`` reads back).
    """

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        block_size: int,
        *,
        planes: int,
        width: int,
        page: torch.Tensor | None = None,
        writer: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], None] | None = None,
        describe: str = "",
    ) -> None:
        where = f" ({describe})" if describe else ""
        if not kv_caches:
            raise KVLayoutError(f"vLLM registered no KV cache tensors{where}")
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        for name, tensor in kv_caches.items():
            ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if ident in seen:  # layers sharing one KV cache: move it once
                continue
            seen.add(ident)
            names.append(name)
            tensors.append(tensor)
        first = tensors[0]
        shape, stride = tuple(first.shape), tuple(first.stride())
        for name, tensor in zip(names, tensors):
            if (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device) != (
                shape, stride, first.dtype, first.device,
            ):
                raise KVLayoutError(
                    f"every attention layer must have the same KV cache shape, strides, dtype "
                    f"and device{where}; layer '{name}' has {tuple(tensor.shape)} "
                    f"{tuple(tensor.stride())} {tensor.dtype} {tensor.device}, layer "
                    f"'{names[0]}' has {shape} {stride} {first.dtype} {first.device}"
                )
        if len(shape) != 4 or stride[3] != 1:
            raise KVLayoutError(
                f"unknown KV cache layout{where}: shape {shape}, strides {stride}, dtype "
                f"{first.dtype}; the lmcache connector reads vLLM 0.32's [blocks, heads, "
                "tokens, content] views with contiguous content"
            )
        num_kernel_blocks, heads, kernel_block, content = shape
        if planes * width != content or planes not in (1, 2):
            raise KVLayoutError(
                f"unknown KV cache layout{where}: shape {shape} has {content} content elements "
                f"per head and token, expected {planes} x {width}"
            )
        if block_size % kernel_block != 0:
            raise KVLayoutError(
                f"unknown KV cache layout{where}: kernel blocks of {kernel_block} tokens do not "
                f"divide vLLM's block size {block_size}"
            )
        self.layer_names = names
        self._tensors = tensors
        self._writer = writer
        self.block_size = block_size
        self.kernel_block = kernel_block
        self.num_kernel_blocks = num_kernel_blocks
        self.device = first.device
        self.format = ChunkFormat(len(tensors), planes, heads, width, first.dtype)
        if page is None:
            page = strided_page(kernel_block, heads, planes, width, stride[2], stride[1])
        elif tuple(page.shape) != (kernel_block, heads, planes, width):
            raise KVLayoutError(
                f"page map of shape {tuple(page.shape)} does not match blocks of {kernel_block} "
                f"tokens x {heads} heads x {planes} x {width}{where}"
            )
        self._page = page
        per_token = page.reshape(kernel_block, -1)  # [N, heads * planes * width], chunk order
        offsets = [t.storage_offset() for t in tensors]
        self._g = g = math.gcd(_run_length(per_token), stride[0], *offsets)
        self._row_bytes = g * first.dtype.itemsize
        self._block_stride = stride[0] // g
        # the row of each run of g elements of each token position of a block, in chunk order
        self._page_rows = (per_token[:, ::g] // g).contiguous().to(self.device)  # [N, E/g]
        self._runs = self._plan_runs(tensors, offsets)

    def _plan_runs(self, tensors: list[torch.Tensor], offsets: list[int]) -> list[_Run]:
        g, device = self._g, self.device
        runs: list[_Run] = []
        start = 0
        for i in range(1, len(tensors) + 1):
            same = i < len(tensors) and (
                tensors[i].untyped_storage().data_ptr() == tensors[start].untyped_storage().data_ptr()
            )
            if same:
                continue
            storage = tensors[start].untyped_storage()
            rows = torch.empty(0, dtype=torch.uint8, device=device).set_(
                storage, 0, (storage.nbytes() // self._row_bytes, self._row_bytes)
            )
            layer = torch.tensor([o // g for o in offsets[start:i]], dtype=torch.long)
            runs.append(_Run(start, i - start, rows, layer.to(device)))
            start = i
        return runs

    # --- addressing --------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.num_kernel_blocks * self.kernel_block

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Slots of tokens ``[start, end)`` of a request whose blocks are ``block_ids``."""
        positions = torch.arange(start, end, dtype=torch.long)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.long)
        if end > start and (end - 1) // self.block_size >= len(blocks):
            raise IndexError(
                f"tokens up to {end} need {(end - 1) // self.block_size + 1} blocks, "
                f"the request has {len(blocks)}"
            )
        slots = blocks[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device)

    def _rows(self, run: _Run, slots: torch.Tensor) -> torch.Tensor:
        # 2-D broadcasts and index_select: several times cheaper than 5-D ones and fancy indexing
        slots = slots.to(self.device)
        inside = self._page_rows.index_select(0, slots % self.kernel_block)  # [n, E/g]
        token = inside + ((slots // self.kernel_block) * self._block_stride).view(-1, 1)
        return (run.base.view(-1, 1) + token.view(1, -1)).view(-1)

    # --- copies ------------------------------------------------------------------------------
    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens at ``slots`` as a canonical chunk (into ``out`` when given), on the device."""
        shape = self.format.shape(len(slots))
        if out is None:
            out = torch.empty(shape, dtype=self.format.dtype, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != self.format.dtype or not out.is_contiguous():
            raise ChunkLayoutError(f"gather needs a contiguous {shape} {self.format.dtype} output")
        raw = self._raw(_GATHER_RAW)
        flat = out.view(raw)
        for run in self._runs:
            rows = run.rows.view(raw)
            dst = flat[run.first : run.first + run.count].view(-1, rows.shape[1])
            torch.index_select(rows, 0, self._rows(run, slots), out=dst)
        return out

    def scatter(self, chunk: torch.Tensor, slots: torch.Tensor) -> None:
        """Write a canonical chunk (any device) into the tokens at ``slots``."""
        expected = self.format.shape(len(slots))
        if tuple(chunk.shape) != expected or chunk.dtype != self.format.dtype:
            raise ChunkLayoutError(
                f"stored chunk has shape {tuple(chunk.shape)} and dtype {chunk.dtype}; this "
                f"vLLM instance needs {expected} and {self.format.dtype}"
            )
        if self._writer is not None:  # the backend's own cache writer: the fastest way in
            self._writer(self._tensors, chunk.to(self.device, non_blocking=True).contiguous(), slots)
            return
        raw = self._raw(_SCATTER_RAW)
        src = chunk.to(self.device, non_blocking=True).contiguous().view(raw)
        for run in self._runs:
            rows = run.rows.view(raw)
            part = src[run.first : run.first + run.count].view(-1, rows.shape[1])
            rows.index_copy_(0, self._rows(run, slots), part)

    def _raw(self, candidates: tuple[torch.dtype, ...]) -> torch.dtype:
        return next(raw for raw in candidates if self._row_bytes % raw.itemsize == 0)


def strided_page(
    block_tokens: int, heads: int, planes: int, width: int, token_stride: int, head_stride: int
) -> torch.Tensor:
    """Element offsets in a block of ``[tokens, heads, planes, width]`` where each token's
    content is its keys then its values (every backend but those that pack a page their own way)."""
    n = torch.arange(block_tokens, dtype=torch.long).view(-1, 1, 1, 1) * token_stride
    h = torch.arange(heads, dtype=torch.long).view(1, -1, 1, 1) * head_stride
    p = torch.arange(planes, dtype=torch.long).view(1, 1, -1, 1) * width
    d = torch.arange(width, dtype=torch.long).view(1, 1, 1, -1)
    return n + h + p + d


def _run_length(per_token: torch.Tensor) -> int:
    """The longest run ``g`` (dividing a token's element count) of a token's elements that sit
    together in the page: element ``i`` of a run at ``offset + i % g``, every run starting at a
    multiple of ``g``."""
    elements = per_token.shape[-1]
    for g in sorted((g for g in range(1, elements + 1) if elements % g == 0), reverse=True):
        runs = per_token.reshape(-1, elements // g, g)
        if bool((runs[..., 0] % g == 0).all()) and bool(
            (runs == runs[..., :1] + torch.arange(g, dtype=per_token.dtype)).all()
        ):
            return g
    return 1


def allocate_paged_cache(
    layout: str,
    *,
    num_layers: int,
    num_blocks: int,
    heads: int,
    block_tokens: int,
    content: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fill: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer ``[B, H, N, C]`` views over one allocation in ``layout``'s physical order.

    What vLLM 0.32's ``allocate_kv_cache`` builds, for tests and benchmarks that must run
    without vLLM (random bits when ``fill``, so every dtype, fp8 included, gets distinct values).
    """
    order = LAYOUT_ORDERS[layout]
    logical = (num_layers, num_blocks, heads, block_tokens, content)
    physical = tuple(logical[d] for d in order)
    nbytes = math.prod(physical) * dtype.itemsize
    if fill:
        raw = torch.randint(-128, 128, (nbytes,), dtype=torch.int8, generator=generator)
        raw = raw.to(device)
    else:
        raw = torch.zeros(nbytes, dtype=torch.int8, device=device)
    flat = raw.view(dtype)
    strides = [0] * 5
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= logical[dim]
    view = flat.as_strided(logical, strides)
    return {f"model.layers.{i}.self_attn.attn": view[i] for i in range(num_layers)}
