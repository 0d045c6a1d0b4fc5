"""Several threads storing, reading, pinning and removing at once."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import torch

from lmcache_core.events import EventKind, KVEvent

from lmcache_backend_cpu import LocalCPUBackend

from cpu_helpers import filled, key

MakeBackend = Callable[[int], LocalCPUBackend]
KEYS = 40


def chunk_bytes(k: int) -> int:
    return 256 * (1 + k % 7) + k  # every key has its own size and byte value


def test_threads_sharing_a_backend_see_intact_chunks_and_consistent_events(
    make_backend: MakeBackend, events: list[KVEvent]
) -> None:
    capacity = 24 * 1024
    backend = make_backend(capacity)
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait(timeout=10)
            for _ in range(1500):
                k = rng.randrange(KEYS)
                op = rng.random()
                if op < 0.5:
                    backend.put(key(k), filled(chunk_bytes(k), k), num_tokens=k + 1)
                elif op < 0.85:
                    view = backend.get(key(k))
                    if view is not None:
                        assert torch.equal(view.tensor, filled(chunk_bytes(k), k))
                        assert view.num_tokens == k + 1
                        view.release()
                elif op < 0.93:
                    backend.remove(key(k))
                elif op < 0.97:
                    backend.pin(key(k))
                else:
                    backend.unpin(key(k))
                assert backend.stats()["used_bytes"] <= capacity
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures

    replayed: dict[object, int] = {}
    for event in events:
        if event.kind == EventKind.ADMIT:
            assert event.key not in replayed
            replayed[event.key] = event.num_tokens
        else:
            assert event.kind == EventKind.EVICT and replayed.pop(event.key) == event.num_tokens
    assert replayed == dict(backend.inventory())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stats = backend.stats()
    assert stats["views"] == 0
    assert stats["used_bytes"] == sum(chunk_bytes(k.chunk_hash) for k in replayed)
    for k in replayed:
        with backend.get(k) as view:
            assert torch.equal(view.tensor, filled(chunk_bytes(k.chunk_hash), k.chunk_hash))
