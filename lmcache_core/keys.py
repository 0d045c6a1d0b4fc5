"""Chunk keys and the prefix-chained token hash.

Hash scheme ``xxh3-64-chain/v1`` (stable across processes, machines and Python versions):

* tokens are encoded as little-endian signed 64-bit integers;
* ``seed_0 = xxh3_64(b"lmcache/v1" + namespace.encode("utf-8"), seed=0)``;
* the tokens are cut into chunks of ``chunk_size`` (the last chunk may be shorter) and
  ``hash_i = xxh3_64(encoded chunk_i, seed=hash_{i-1})`` with ``hash_{-1} = seed_0``.

So one hash names the whole prefix up to and including its chunk, and any program that
reproduces these three lines (the controller, a router written in another language) finds
the same keys. Nothing here uses Python's ``hash()`` or a per-process random seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import xxhash

HASH_SCHEME = "xxh3-64-chain/v1"

TokenSequence = Union[Sequence[int], np.ndarray, "torch.Tensor"]  # noqa: F821


def as_token_array(tokens: TokenSequence) -> np.ndarray:
    """Return ``tokens`` as a contiguous little-endian int64 numpy array (no copy when possible)."""
    if hasattr(tokens, "numpy") and hasattr(tokens, "device"):  # torch tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens, dtype="<i8")
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a flat sequence of ints, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def namespace_seed(namespace: str = "") -> int:
    """The chain's starting seed for a namespace (tenant salt); ``""`` is the shared namespace."""
    return xxhash.xxh3_64_intdigest(b"lmcache/v1" + namespace.encode("utf-8"), seed=0)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence: its prefix hash and the half-open token range it covers."""

    chunk_hash: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class TokenHasher:
    """Cuts token sequences into chunks and computes their prefix-chained hashes.

    >>> h = TokenHasher(chunk_size=4)
    >>> [s.num_tokens for s in h.spans(list(range(10)))]
    [4, 4, 2]
    """

    def __init__(self, chunk_size: int, namespace: str = "") -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.chunk_size = chunk_size
        self.namespace = namespace
        self.seed = namespace_seed(namespace)

    def hashes(self, tokens: TokenSequence) -> list[int]:
        """Prefix hashes, one per chunk, the partial last chunk included."""
        data = memoryview(as_token_array(tokens)).cast("B")
        step = self.chunk_size * 8
        digest = xxhash.xxh3_64_intdigest
        out: list[int] = []
        h = self.seed
        for off in range(0, len(data), step):
            h = digest(data[off : off + step], seed=h)
            out.append(h)
        return out

    def spans(self, tokens: TokenSequence) -> list[ChunkSpan]:
        """Chunks with their hashes and token ranges."""
        n = len(tokens)
        cs = self.chunk_size
        return [
            ChunkSpan(h, i * cs, min((i + 1) * cs, n)) for i, h in enumerate(self.hashes(tokens))
        ]


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Names one stored chunk: the model and shard it belongs to, and its prefix hash.

    ``chunk_hash`` already folds in the namespace (see the module docstring), so two tenants
    never share keys; the other fields keep two models, two tensor-parallel layouts or two KV
    dtypes from ever colliding.
    """

    model_name: str
    world_size: int
    worker_id: int
    kv_dtype: str
    chunk_hash: int

    def to_string(self) -> str:
        """A file-name-safe, round-trippable text form (``from_string`` reads it back)."""
        model = self.model_name.replace("/", "%2F").replace("@", "%40")
        return f"{model}@{self.world_size}@{self.worker_id}@{self.kv_dtype}@{self.chunk_hash:016x}"

    @classmethod
    def from_string(cls, text: str) -> "ChunkKey":
        model, world, worker, dtype, h = text.split("@")
        model = model.replace("%40", "@").replace("%2F", "/")
        return cls(model, int(world), int(worker), dtype, int(h, 16))


@dataclass(frozen=True, slots=True)
class KeyMaker:
    """Builds ``ChunkKey``s for one engine (one model shard)."""

    model_name: str
    world_size: int
    worker_id: int
    kv_dtype: str

    def key(self, chunk_hash: int) -> ChunkKey:
        return ChunkKey(self.model_name, self.world_size, self.worker_id, self.kv_dtype, chunk_hash)
