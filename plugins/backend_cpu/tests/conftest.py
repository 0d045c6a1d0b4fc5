"""Fixtures: an event bus whose events are recorded, and backends announcing on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lmcache_core.events import EventBus, KVEvent

from lmcache_backend_cpu import LocalCPUBackend


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def events(bus: EventBus) -> list[KVEvent]:
    """Every event the bus delivers, in delivery order."""
    seen: list[KVEvent] = []
    bus.subscribe(seen.append)
    return seen


@pytest.fixture
def make_backend(bus: EventBus, events: list[KVEvent]) -> Iterator[Callable[[int], LocalCPUBackend]]:
    """Builds backends of a given capacity on the recorded bus; closes them afterwards."""
    made: list[LocalCPUBackend] = []

    def make(capacity: int) -> LocalCPUBackend:
        backend = LocalCPUBackend(capacity, bus.sink("LocalCPUBackend"))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
