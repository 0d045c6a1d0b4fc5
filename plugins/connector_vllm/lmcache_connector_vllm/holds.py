"""Chunks held for requests between the scheduler's lookup and the worker's load.

vLLM's scheduler asks how many tokens are cached (``get_num_new_matched_tokens``) one step
before the worker loads them. A chunk evicted or cleared in between would fail the request
under vLLM's default ``kv_load_failure_policy``, so the worker's lookup *holds* what it found
(``CacheEngine.hold``) and the load uses exactly those views. A hold ends when its load is
done, when the scheduler releases it (the request went away or was not scheduled), or after
``ttl`` seconds, so a request lost on the way never keeps memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from lmcache_core.engine import PrefixHold


@dataclass
class _Entry:
    tokens: np.ndarray
    hold: PrefixHold
    deadline: float


class HoldTable:
    """Holds by request id, each with a deadline; an owned thread releases expired ones."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._closed = threading.Event()
        self.expired = 0  # holds released by their deadline (requests lost before their load)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="lmcache-holds", daemon=True)
        self._sweeper.start()

    def __len__(self) -> int:
        return len(self._entries)

    def matching(self, req_id: str, tokens: np.ndarray) -> PrefixHold | None:
        """The request's hold if it was taken for these same tokens (its deadline restarts)."""
        with self._lock:
            entry = self._entries.get(req_id)
            if entry is None or not np.array_equal(entry.tokens, tokens):
                return None
            entry.deadline = time.monotonic() + self.ttl
            return entry.hold

    def put(self, req_id: str, tokens: np.ndarray, hold: PrefixHold) -> None:
        """Keep ``hold`` for ``req_id``, releasing the one it replaces."""
        entry = _Entry(np.array(tokens, copy=True), hold, time.monotonic() + self.ttl)
        with self._lock:
            if self._closed.is_set():
                hold.release()
                return
            old = self._entries.pop(req_id, None)
            self._entries[req_id] = entry
        if old is not None:
            old.hold.release()

    def take(self, req_id: str) -> PrefixHold | None:
        """Remove and return the request's hold (the caller releases it)."""
        with self._lock:
            entry = self._entries.pop(req_id, None)
        return None if entry is None else entry.hold

    def release(self, req_id: str) -> None:
        hold = self.take(req_id)
        if hold is not None:
            hold.release()

    def sweep(self, now: float | None = None) -> int:
        """Release holds past their deadline; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [rid for rid, e in self._entries.items() if e.deadline <= now]
            entries = [self._entries.pop(rid) for rid in gone]
            self.expired += len(entries)
        for entry in entries:
            entry.hold.release()
        return len(entries)

    def _sweep_loop(self) -> None:
        interval = min(max(self.ttl / 4, 0.05), 5.0)
        while not self._closed.wait(interval):
            self.sweep()

    def close(self) -> None:
        """Release every hold and stop the sweeper."""
        self._closed.set()
        self._sweeper.join(timeout=5)
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            entry.hold.release()
