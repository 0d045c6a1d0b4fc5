"""Admit/evict/clear announcements: contents and order."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lmcache_core.events import EventBus, EventKind, KVEvent

from lmcache_backend_cpu import LocalCPUBackend

from cpu_helpers import filled, key

MakeBackend = Callable[[int], LocalCPUBackend]
UNIT = 1024


def summary(events: list[KVEvent]) -> list[tuple[str, int | None, int]]:
    return [
        (e.kind.name, None if e.key is None else e.key.chunk_hash, e.num_tokens) for e in events
    ]


def test_events_announce_every_change_in_order(make_backend: MakeBackend, events: list[KVEvent]) -> None:
    backend = make_backend(2 * UNIT)
    backend.put(key(1), filled(UNIT, 1), 10)
    backend.put(key(2), filled(UNIT, 2), 20)
    backend.put(key(3), filled(UNIT, 3), 30)  # evicts 1 before 3 is admitted
    backend.put(key(3), filled(UNIT, 3), 30)  # already present: no event
    assert not backend.put(key(4), filled(3 * UNIT, 4), 40)  # refused: no event
    backend.remove(key(2))
    backend.remove(key(2))  # absent: no event
    backend.put(key(5), filled(UNIT, 5), 50)
    backend.clear()
    assert summary(events) == [
        ("ADMIT", 1, 10),
        ("ADMIT", 2, 20),
        ("EVICT", 1, 10),
        ("ADMIT", 3, 30),
        ("EVICT", 2, 20),
        ("ADMIT", 5, 50),
        ("CLEAR", None, 80),
    ]
    assert [e.seq for e in events] == list(range(1, 8))
    assert {e.location for e in events} == {"LocalCPUBackend"}
    assert events[0].key == key(1)


def test_admitted_chunk_is_readable_when_its_event_arrives(make_backend: MakeBackend, bus: EventBus) -> None:
    backend = make_backend(UNIT)
    seen_present: list[bool] = []
    # a subscriber must not call back into the backend (put() holds its lock while it
    # announces), so another thread waits for the announcement and then looks
    admitted = threading.Event()
    bus.subscribe(lambda e: admitted.set() if e.kind == EventKind.ADMIT else None)
    done = threading.Thread(target=lambda: backend.put(key(1), filled(UNIT, 1), 1))
    done.start()
    assert admitted.wait(timeout=10)
    seen_present.append(backend.contains(key(1)))
    with backend.get(key(1)) as view:
        seen_present.append(int(view.tensor[0]) == 1)
    done.join(timeout=10)
    assert seen_present == [True, True]


def test_clear_sends_one_event_with_the_tokens_removed(make_backend: MakeBackend, events: list[KVEvent]) -> None:
    backend = make_backend(8 * UNIT)
    for i in range(5):
        backend.put(key(i), filled(UNIT, i), 3)
    backend.pin(key(0))
    assert backend.clear() == 15
    assert summary(events[5:]) == [("CLEAR", None, 15)]


def test_replaying_events_reproduces_the_inventory(make_backend: MakeBackend, events: list[KVEvent]) -> None:
    backend = make_backend(5 * UNIT)
    for i in range(30):
        backend.put(key(i % 11), filled(UNIT * (1 + i % 3), i), i)
        view = backend.get(key(i % 7)) if i % 4 == 0 else None
        if view is not None:
            view.release()
        if i % 9 == 0:
            backend.remove(key(i % 5))
    replayed: dict[object, int] = {}
    for event in events:
        if event.kind == EventKind.ADMIT:
            replayed[event.key] = event.num_tokens
        elif event.kind == EventKind.EVICT:
            assert replayed.pop(event.key) == event.num_tokens
        else:
            replayed.clear()
    assert replayed == dict(backend.inventory())
