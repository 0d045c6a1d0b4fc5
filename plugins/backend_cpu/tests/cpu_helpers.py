"""Helpers shared by the LocalCPUBackend tests (a module name no other test folder uses)."""

from __future__ import annotations

import torch

from lmcache_core.keys import ChunkKey


def key(i: int) -> ChunkKey:
    """A distinct chunk key per integer."""
    return ChunkKey("test/model", 1, 0, "float16", i)


def filled(nbytes: int, value: int) -> torch.Tensor:
    """A uint8 chunk of ``nbytes`` whose every byte is ``value`` (to spot overwrites)."""
    return torch.full((nbytes,), value % 256, dtype=torch.uint8)
