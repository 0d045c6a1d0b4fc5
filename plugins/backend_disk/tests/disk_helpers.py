"""Helpers shared by the LocalDiskBackend tests (a uniquely named module, so plugins' test
folders never shadow each other's imports)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from lmcache_core.events import EventBus, KVEvent
from lmcache_core.keys import ChunkKey

if TYPE_CHECKING:
    from lmcache_backend_disk import LocalDiskBackend

CHUNK_SUFFIX = ".kvchunk"


def key_of(i: int, model: str = "org/model") -> ChunkKey:
    """The i-th test key."""
    return ChunkKey(model, 1, 0, "bfloat16", i)


def data_for(i: int, shape: tuple[int, ...] = (2, 16, 64), dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Deterministic tensor contents for key i, so another process can reproduce them."""
    gen = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=gen).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def chunk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{CHUNK_SUFFIX}"))


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def fill(backend: "LocalDiskBackend", ids: Iterable[int], tokens: int = 16) -> None:
    """Put the chunks of ``ids`` and wait until they are written."""
    for i in ids:
        assert backend.put(key_of(i), data_for(i), tokens)
    assert backend.flush(timeout=30)


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place (negative offsets count from the end)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        pos = f.tell()
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)  # polling interval, not a wait for a fixed duration


class Events:
    """A real EventBus with a subscriber recording everything announced."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.seen: list[KVEvent] = []
        self.bus.subscribe(self.seen.append)
        self.sink = self.bus.sink("LocalDiskBackend")

    def kinds(self) -> list[str]:
        return [event.kind.name for event in self.seen]

    def keys(self, kind: str) -> list[ChunkKey | None]:
        return [event.key for event in self.seen if event.kind.name == kind]


#: chunks of 1 MiB: long enough writes that a SIGKILL often lands in the middle of one
CRASH_SHAPE = (256, 1024)


def crash_tokens(i: int) -> int:
    return i % 256 + 1
