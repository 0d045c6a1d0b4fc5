"""The controller's live event feed: what operators watch on the web page (``/page/events``).

The controller calls ``EventFeed`` from its event loop at the moments worth showing: a worker
registered, was refused, left or was lost, and each applied event batch (``applied``).
``publish`` never waits: each subscriber has a bounded buffer, and one that falls
``SUBSCRIBER_BUFFER`` events behind is dropped (its stream ends; the page reconnects and asks
for what it missed by id). Batches are counted and published once a second (``flush``): what
each rank cleared, and what each (instance, location) stored, evicted and resynced, so a busy
fleet makes a few events a second, not one per chunk, and a batch's own path pays only for
keeping a reference to its arrays.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import anyio
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectSendStream

from lmcache_core.errors import LMCacheError
from lmcache_core.events import EventKind

#: events kept for a reconnecting page (``since``) and for a page that just opened
RECENT_EVENTS = 500
#: events a subscriber may be behind before it is dropped
SUBSCRIBER_BUFFER = 1000
#: subscribers at once (more: ``TooManySubscribersError``)
MAX_SUBSCRIBERS = 64
#: batches kept uncounted at most (a busy second is counted in several goes)
MAX_PENDING_BATCHES = 4096

_ADMIT, _EVICT, _CLEAR = int(EventKind.ADMIT), int(EventKind.EVICT), int(EventKind.CLEAR)
_KINDS = max(_ADMIT, _EVICT, _CLEAR) + 1
#: what ``flush`` publishes per (instance, location): admits of live batches, evictions, and
#: admits of resync batches (an inventory sent again, not new data)
_TALLIED = ("stored", "evicted", "resynced")


class TooManySubscribersError(LMCacheError):
    """Every subscriber slot of the feed is taken (the API answers 429)."""


class _Tally:
    """What the batches of one (instance, location) did since the last flush."""

    __slots__ = ("ranks", "chunks", "tokens")

    def __init__(self) -> None:
        self.ranks: set[int] = set()
        self.chunks = dict.fromkeys(_TALLIED, 0)
        self.tokens = dict.fromkeys(_TALLIED, 0)

    def add(self, kind: str, chunks: int, tokens: float) -> None:
        if chunks:
            self.chunks[kind] += int(chunks)
            self.tokens[kind] += int(tokens)


class EventFeed:
    """Recent controller events and their live subscribers."""

    def __init__(self, recent: int = RECENT_EVENTS, buffer: int = SUBSCRIBER_BUFFER,
                 max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._ids = itertools.count(1)
        self._buffer = buffer
        self._max_subscribers = max_subscribers
        self._subscribers: set[MemoryObjectSendStream[dict[str, Any]]] = set()
        self._tallies: dict[tuple[str, str], _Tally] = {}
        #: batches applied since they were last counted (instance, rank, location, reset, kinds, tokens)
        self._pending: list[tuple[str, int, str, bool, np.ndarray, np.ndarray]] = []
        self.dropped = 0  # subscribers dropped for being too slow

    @property
    def last_id(self) -> int:
        return self.recent[-1]["id"] if self.recent else 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def full(self) -> bool:
        """Whether every subscriber slot is taken."""
        return len(self._subscribers) >= self._max_subscribers

    def publish(self, kind: str, text: str, **fields: Any) -> dict[str, Any]:
        """Record one event and hand it to every subscriber; never waits (a subscriber whose
        buffer is full is dropped)."""
        event = {"id": next(self._ids), "time": round(time.time(), 3), "kind": kind, "text": text, **fields}
        self.recent.append(event)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                self._drop(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(stream)
        return event

    def since(self, last_id: int) -> list[dict[str, Any]]:
        """Recent events after ``last_id`` (oldest first)."""
        return [e for e in self.recent if e["id"] > last_id]

    def subscribe(self) -> ObjectReceiveStream[dict[str, Any]]:
        """A stream of the events published from now on; it ends when the subscriber is dropped
        or the feed closes. ``TooManySubscribersError`` past ``max_subscribers``."""
        if self.full:
            raise TooManySubscribersError(
                f"the event feed has {self._max_subscribers} subscribers already; close a page and retry"
            )
        send: ObjectSendStream[dict[str, Any]]
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](self._buffer)
        self._subscribers.add(send)
        return _Subscription(receive, send, self)

    def unsubscribe(self, send: ObjectSendStream[dict[str, Any]]) -> None:
        if send in self._subscribers:
            self._subscribers.discard(send)
            send.close()

    def _drop(self, stream: MemoryObjectSendStream[dict[str, Any]]) -> None:
        self.dropped += 1
        self.unsubscribe(stream)

    def close(self) -> None:
        """End every subscriber's stream (the controller is stopping)."""
        for stream in list(self._subscribers):
            self.unsubscribe(stream)

    # --- what the controller reports ------------------------------------------------------------
    def worker_event(self, kind: str, instance_id: str, worker_id: int, why: str, **fields: Any) -> None:
        """A worker's registration, refusal, goodbye or loss."""
        self.publish(kind, f"{instance_id}/{worker_id} {why}", instance_id=instance_id, worker_id=worker_id, **fields)

    def applied(self, instance_id: str, worker_id: int, location: str, reset: bool,
                kinds: np.ndarray, tokens: np.ndarray) -> None:
        """One event batch was applied: it is counted at the next ``flush`` (here it is only
        kept, which costs the batch's path a list append)."""
        self._pending.append((instance_id, worker_id, location, reset, kinds, tokens))
        if len(self._pending) >= MAX_PENDING_BATCHES:
            self._count_pending()

    def _count_pending(self) -> None:
        """Count the kept batches, a few numpy calls per (instance, rank, location) whatever
        their number; publish their clears."""
        groups: dict[tuple[str, int, str, bool], list[tuple[np.ndarray, np.ndarray]]] = {}
        for instance_id, worker_id, location, reset, kinds, tokens in self._pending:
            groups.setdefault((instance_id, worker_id, location, reset), []).append((kinds, tokens))
        self._pending = []
        for (instance_id, worker_id, location, reset), batches in groups.items():
            kinds = np.concatenate([k for k, _ in batches])
            if not len(kinds):
                continue
            tokens = np.concatenate([t for _, t in batches])
            counts = np.bincount(kinds, minlength=_KINDS)
            tokens_of = np.bincount(kinds, weights=tokens, minlength=_KINDS)
            key = (instance_id, location)
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally()
            tally.ranks.add(worker_id)
            if reset:
                tally.add("resynced", counts[_ADMIT], tokens_of[_ADMIT])
            else:
                tally.add("stored", counts[_ADMIT], tokens_of[_ADMIT])
                tally.add("evicted", counts[_EVICT], tokens_of[_EVICT])
            if counts[_CLEAR]:
                cleared = int(tokens_of[_CLEAR])
                self.publish(
                    "cleared", f"{instance_id}/{worker_id} cleared {location} ({cleared} tokens)",
                    instance_id=instance_id, worker_id=worker_id, location=location, tokens=cleared,
                )

    def flush(self) -> None:
        """Publish what the batches since the last flush cleared, stored, evicted and resynced."""
        self._count_pending()
        tallies, self._tallies = self._tallies, {}
        for (instance_id, location), tally in sorted(tallies.items()):
            ranks = len(tally.ranks)
            for kind in _TALLIED:
                chunks = tally.chunks[kind]
                if chunks:
                    tokens = tally.tokens[kind]
                    self.publish(
                        kind,
                        f"{instance_id} {kind} {chunks} chunk{'s' if chunks != 1 else ''} ({tokens} tokens) "
                        f"at {location}" + (f" over {ranks} ranks" if ranks > 1 else ""),
                        instance_id=instance_id, location=location, chunks=chunks, tokens=tokens,
                    )


class _Subscription(ObjectReceiveStream[dict[str, Any]]):
    """A subscriber's end: receiving events; closing it unsubscribes."""

    def __init__(self, receive: ObjectReceiveStream[dict[str, Any]], send: ObjectSendStream[dict[str, Any]],
                 feed: EventFeed) -> None:
        self._receive = receive
        self._send = send
        self._feed = feed

    async def receive(self) -> dict[str, Any]:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._feed.unsubscribe(self._send)
        await self._receive.aclose()
