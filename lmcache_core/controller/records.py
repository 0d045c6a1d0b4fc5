"""What the controller knows: one record per worker and per location, and the event ids it
handed out. Plain data; the parts of the controller (``registry``, ``apply``, ``commands``)
change it, and ``base.ControllerBase`` says who owns which collection."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from lmcache_core.keys import TokenHasher
from lmcache_core.wire import EventBatch, Heartbeat, WorkerRegistration

#: events of each kind remembered for /check_finish (oldest forgotten first)
EVENT_HISTORY = 65_536

HashingKey = tuple[str, int, str]  # scheme, chunk_size, namespace


@dataclass
class LocationState:
    """What the controller knows about one worker's one location."""

    name: str
    holder: int
    #: place in the worker's location list (fastest first); breaks ties in lookups
    position: int = 0
    applied_seq: int = 0
    #: the highest seq known to exist (a batch received, a heartbeat's last_seq)
    known_seq: int = 0
    #: batches received ahead of a missing one (or of the awaited reset), by seq
    held: dict[int, tuple[EventBatch, tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    #: monotonic time the current gap (known_seq > applied_seq) was noticed; None: no gap
    gap_since: float | None = None
    #: no base to apply batches on (a new run, a resync asked for): only a reset batch or a
    #: pulled inventory snapshot applies; batches meanwhile are held
    awaiting_reset: bool = True
    #: its inventory pull (recovery.py): None, "queued" or "pulling"
    pull: str | None = None


@dataclass
class WorkerState:
    """One registered worker (one rank of one instance)."""

    registration: WorkerRegistration
    hashing: HashingKey
    locations: dict[str, LocationState]
    registered_at: float
    last_seen: float  # monotonic
    last_heartbeat_time: float = 0.0  # unix
    last_beat: Heartbeat | None = None  # its latest heartbeat (bytes used per location)

    @property
    def instance_id(self) -> str:
        return self.registration.instance_id

    @property
    def worker_id(self) -> int:
        return self.registration.worker_id

    @property
    def epoch(self) -> str:
        return self.registration.epoch

    @property
    def name(self) -> str:
        return f"{self.instance_id}/{self.worker_id}"


class HolderMeta(NamedTuple):
    """One holder as lookups see it."""

    worker: WorkerState
    loc: LocationState
    instance_id: str
    rank: tuple[str, int]
    model: str
    location: str
    position: int



@dataclass
class HashingGroup:
    """Workers that hash tokens the same way; a lookup hashes once per group."""

    hasher: TokenHasher
    workers: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class EventRecord:
    """What ``/check_finish`` reports about one event id."""

    kind: str
    status: str = "running"
    detail: str | None = None


class EventLog:
    """Ids handed out by the API and their status, for ``/check_finish``.

    One bounded record per kind (``capacity`` ids each, oldest forgotten first), so a flood of
    one kind never pushes out another's: a clear's id still answers after any number of lookups.
    """

    def __init__(self, capacity: int = EVENT_HISTORY) -> None:
        self._kinds: dict[str, OrderedDict[str, EventRecord]] = {}
        self._capacity = capacity

    def start(self, kind: str, status: str = "running") -> str:
        event_id = f"{kind}-{secrets.token_hex(8)}"
        events = self._kinds.get(kind)
        if events is None:
            events = self._kinds[kind] = OrderedDict()
        events[event_id] = EventRecord(kind, status)
        if len(events) > self._capacity:
            events.popitem(last=False)
        return event_id

    def finish(self, event_id: str, ok: bool = True, detail: str | None = None) -> None:
        record = self.get(event_id)
        if record is not None:
            record.status = "finished" if ok else "failed"
            record.detail = detail

    def get(self, event_id: str) -> EventRecord | None:
        events = self._kinds.get(event_id.rpartition("-")[0])  # ids are "<kind>-<hex>"
        return events.get(event_id) if events is not None else None

