"""The controller: registered workers, the KV index they feed, and the commands it sends.

``Controller`` is a facade over three parts, each in its own module over the shared state of
``base.ControllerBase`` (records in ``records.py``):

* ``registry.py``: registrations, epochs and duplicate instance ids, heartbeats' liveness,
  goodbyes, expiry, hellos;
* ``apply.py``: event batches in seq order per location, held batches, gaps and their repair
  (replay, resync);
* ``recovery.py``: the inventories it lacks, pulled page by page, a bounded window of
  workers at a time;
* ``commands.py``: commands to workers (clear, health, the repairs) with deadlines, fan-out
  and ``/check_finish`` ids.

This module starts and stops the subscriptions and answers lookups and introspection. Everything
runs on one event loop; handlers never hold a lock across an ``await``. The one exception is
``hash_lookup`` given a snapshot of hashers: it reads no shared state, so a big lookup hashes in
a worker thread. The protocol is written down in ``docs/protocol.md``.

Every message must name, inside it, the instance and rank its topic names (and a command's
reply the worker asked): anything else is refused and logged, so credentials that may publish
on one instance's topics never speak for another.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from anyio.abc import TaskGroup

from lmcache_core.controller.apply import MAX_HELD_BATCHES, REPLAYS_BEFORE_RESYNC, EventApplication
from lmcache_core.controller.chunk_commands import ChunkCommands
from lmcache_core.controller.commands import Commands
from lmcache_core.controller.errors import TooManyTokensError, UnknownWorkerError
from lmcache_core.controller.fleet import lmcache_fields
from lmcache_core.controller.models import InstanceInfo, LocationInfo, WorkerInfo
from lmcache_core.controller.peers import find_peer
from lmcache_core.controller.records import (
    EVENT_HISTORY,
    EventLog,
    EventRecord,
    HashingGroup,
    HolderMeta,
    LocationState,
    WorkerState,
)
from lmcache_core.controller.recovery import Recovery
from lmcache_core.controller.registry import HELLO_MIN_INTERVAL, SUPPORTED_SCHEMES, Registry
from lmcache_core.errors import TransportError
from lmcache_core.keys import TokenHasher, as_token_array
from lmcache_core.transport import Message
from lmcache_core.wire import (
    EVENTS_WILDCARD,
    GOODBYE_WILDCARD,
    HEARTBEAT_WILDCARD,
    LEGACY_REGISTER_TOPIC,
    PEER_LOOKUP_WILDCARD,
    REGISTER_WILDCARD,
    HashingParams,
    PeerLookupRequest,
    peer_lookup_topic,
)

__all__ = [
    "EVENT_HISTORY", "HELLO_MIN_INTERVAL", "MAX_HELD_BATCHES", "REPLAYS_BEFORE_RESYNC", "SUPPORTED_SCHEMES",
    "Controller", "EventLog", "EventRecord", "HashingGroup", "HolderMeta", "LocationState", "WorkerState",
]

log = logging.getLogger(__name__)


#: the instance id ``/query_worker_info`` reads as every instance (LMCache's convention)
ALL_INSTANCES = "all"


class Controller(Registry, EventApplication, Recovery, Commands, ChunkCommands):
    """Registry of workers and their KV index, plus the operations the HTTP API exposes."""

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, tg: TaskGroup) -> None:
        """Subscribe to the workers' topics, start housekeeping and the inventory pullers in
        ``tg``, and say hello."""
        self._tg = tg
        bus = self.bus
        self._events_subscription = await bus.subscribe(EVENTS_WILDCARD, self._on_events)
        self._heartbeat_subscription = await bus.subscribe(HEARTBEAT_WILDCARD, self._on_heartbeat)
        self._subscriptions = [
            await bus.subscribe(REGISTER_WILDCARD, self._on_register),
            await bus.subscribe(LEGACY_REGISTER_TOPIC, self._on_legacy_register),
            self._events_subscription,
            self._heartbeat_subscription,
            await bus.subscribe(GOODBYE_WILDCARD, self._on_goodbye),
            await bus.subscribe(PEER_LOOKUP_WILDCARD, self._on_peer_lookup),
        ]
        bus.on_reconnect(self._say_hello)  # runs we dropped meanwhile register again
        await bus.flush()
        self._start_pullers(tg)  # recovery.py: the hello's registrations queue inventory pulls
        await self._say_hello()
        tg.start_soon(self._housekeeping)

    async def stop(self) -> None:
        """Unsubscribe (the task group that ``start`` used is cancelled by its owner)."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in reversed(subscriptions):
            try:
                await sub.unsubscribe()
            except TransportError as exc:
                log.debug("unsubscribing failed: %s", exc)

    # --- peer-to-peer (controller/peers.py) ----------------------------------------------------
    async def _on_peer_lookup(self, msg: Message) -> None:
        request = self._decode_claim(msg, PeerLookupRequest, peer_lookup_topic, "peer lookup")
        if request is not None:
            await self._respond(msg, find_peer(self, request))

    # --- lookup ------------------------------------------------------------------------------
    def lookup(
        self, tokens: Any, model: str | None = None, instance_id: str | None = None
    ) -> dict[str, list[Any]]:
        """Per instance holding a prefix of ``tokens``: [location holding most of it, tokens]."""
        return self.lookup_hashed(self.hash_lookup(tokens), len(tokens), model=model, instance_id=instance_id)

    def lookup_hashers(self) -> list[TokenHasher]:
        """One hasher per hashing group of the live workers (a lookup hashes once per group)."""
        return [group.hasher for group in self._groups.values()]

    def hash_lookup(self, tokens: Any, hashers: list[TokenHasher] | None = None) -> list[tuple[int, np.ndarray]]:
        """(chunk size, chunk hashes) of ``tokens`` per hashing group; ``TooManyTokensError``
        beyond ``controller_max_lookup_tokens``.

        Given ``hashers`` (from ``lookup_hashers``, taken on the event loop) it reads no shared
        state, so a big lookup can hash in a worker thread while the loop serves heartbeats.
        """
        n_tokens = len(tokens)
        limit = self.settings.controller_max_lookup_tokens
        if n_tokens > limit:
            raise TooManyTokensError(
                f"{n_tokens} tokens is more than controller_max_lookup_tokens ({limit})"
            )
        if hashers is None:
            hashers = self.lookup_hashers()
        if n_tokens == 0 or not hashers:
            return []
        arr = tokens if isinstance(tokens, np.ndarray) else as_token_array(tokens)
        hashed = []
        for hasher in hashers:
            hashes = hasher.hashes(arr)
            hashed.append((hasher.chunk_size, np.fromiter(hashes, dtype=np.uint64, count=len(hashes))))
        return hashed

    def lookup_hashed(
        self, hashed: list[tuple[int, np.ndarray]], n_tokens: int, model: str | None = None,
        instance_id: str | None = None,
    ) -> dict[str, list[Any]]:
        """``lookup`` of tokens ``hash_lookup`` hashed: ``LayoutTable`` turns the index's
        per-holder answer into per-instance prefixes with a few array operations."""
        if not hashed:
            return {}
        answers = [(self.index.lookup_grid(hashes), chunk_size) for chunk_size, hashes in hashed]
        return self._layout.layout(answers, n_tokens, instance_id=instance_id, model=model)

    # --- introspection -----------------------------------------------------------------------
    def worker_info(self, worker: WorkerState) -> WorkerInfo:
        """One worker as ``/query_worker_info`` and ``/instances`` describe it."""
        locations = {}
        for name, loc in worker.locations.items():
            chunks, tokens = self.index.holder_stats(loc.holder)
            locations[name] = LocationInfo(chunks=chunks, tokens=tokens)
        reg = worker.registration
        return WorkerInfo(
            **lmcache_fields(worker),
            world_size=reg.world_size,
            epoch=reg.epoch,
            model_name=reg.model_name,
            kv_dtype=reg.kv_dtype,
            hashing=HashingParams(
                scheme=worker.hashing[0], chunk_size=worker.hashing[1], namespace=worker.hashing[2]
            ),
            host=reg.host,
            pid=reg.pid,
            locations=locations,
            seconds_since_heartbeat=round(time.monotonic() - worker.last_seen, 3),
        )

    def worker_infos(self, instance_id: str, worker_ids: list[int] | None = None) -> list[WorkerInfo]:
        """The given ranks of an instance (every rank when None or empty); unknown ones raise
        ``UnknownWorkerError``. ``instance_id`` 'all': those ranks of every instance (LMCache's
        page asks so), in id order, without an error for an instance lacking one."""
        if instance_id == ALL_INSTANCES:
            wanted = set(worker_ids or ())
            return [
                self.worker_info(worker)
                for inst in sorted(self.instances)
                for worker in self._ranks(inst)
                if not wanted or worker.worker_id in wanted
            ]
        ranks = {w.worker_id: w for w in self._ranks(instance_id)}
        wanted_ranks = sorted(ranks) if not worker_ids else list(dict.fromkeys(worker_ids))
        missing = [r for r in wanted_ranks if r not in ranks]
        if missing:
            raise UnknownWorkerError(instance_id, missing, ranks)
        return [self.worker_info(ranks[r]) for r in wanted_ranks]

    def instance_infos(self) -> list[InstanceInfo]:
        """Every registered instance with its workers and totals, sorted by id."""
        out = []
        for inst in sorted(self.instances):
            workers = [self.worker_info(w) for w in self._ranks(inst)]
            first = workers[0]
            out.append(
                InstanceInfo(
                    instance_id=inst,
                    model_name=first.model_name,
                    world_size=first.world_size,
                    locations=self.instance_locations(inst),
                    chunks=sum(l.chunks for w in workers for l in w.locations.values()),
                    tokens=sum(l.tokens for w in workers for l in w.locations.values()),
                    workers=workers,
                )
            )
        return out
