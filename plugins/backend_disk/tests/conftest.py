"""Fixtures for LocalDiskBackend tests: a real directory, a real event bus, real tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from disk_helpers import Events
from lmcache_backend_disk import LocalDiskBackend, area_name
from lmcache_backend_disk.areas import DEFAULT_INSTANCE_ID


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def area_dir(disk_dir: Path) -> Path:
    """The write area a backend with the default instance id takes in ``disk_dir``."""
    return disk_dir / area_name(DEFAULT_INSTANCE_ID)


@pytest.fixture
def make_backend(disk_dir: Path, events: Events) -> Iterator[Callable[..., LocalDiskBackend]]:
    """Builds backends on ``disk_dir`` (by default) and closes whatever is left open."""
    opened: list[LocalDiskBackend] = []

    def make(**kwargs: Any) -> LocalDiskBackend:
        kwargs.setdefault("capacity_bytes", 64 * 1024 * 1024)
        directory = kwargs.pop("directory", disk_dir)
        sink = kwargs.pop("sink", events.sink)
        backend = LocalDiskBackend(directory, sink, **kwargs)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(make_backend: Callable[..., LocalDiskBackend]) -> LocalDiskBackend:
    return make_backend()
