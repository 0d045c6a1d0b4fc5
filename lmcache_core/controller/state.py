"""The controller's state: registered workers, the KV index they feed, and the commands it sends.

Everything here runs on one event loop; handlers never hold a lock across an ``await``. The one
exception is ``hash_lookup`` given a snapshot of hashers: it reads no shared state, so a big
lookup hashes in a worker thread.
Workers speak the protocol of ``lmcache_core.wire``:

* ``register.<inst>.<w>`` (request): a worker's identity, hashing and locations; a new
  ``epoch`` (the worker restarted) empties what the index held for it. The ack asks for a
  resync, which arrives as event batches whose first has ``reset=True``.
* ``events.<inst>.<w>``: ordered ``EventBatch``es per location. A batch ahead of a missing one
  is held (a bounded number per location) and applied in order once the missing one arrives.
  Batches at or below what a clear covered are ignored.
* ``heartbeat.<inst>.<w>``: liveness plus ``last_seq`` per location, which may overtake the
  batches it announces (another subscription): it only tells what exists. A gap, known from a
  held batch or a heartbeat, may stand for ``controller_gap_grace`` seconds; then that worker is
  asked to ``replay`` the missing range from the batches it retains, and to resync that
  location only when it no longer retains them. A worker silent for
  ``controller_heartbeat_timeout`` seconds leaves the index (``remove_holder``). A heartbeat
  from a run the controller does not know gets a hello on that worker's own topic, naming its
  epoch: it alone registers again.
* ``goodbye.<inst>.<w>``: a worker stopping cleanly leaves the index at once.

A registration of a new epoch while another epoch of the same rank is alive (heard from within
``controller_heartbeat_timeout``) is a second instance with the same id: it is refused, logged
on both sides, and the running one keeps its entries.

Every message must name, inside it, the instance and rank its topic names (and a command's
reply the worker asked): anything else is refused and logged, so credentials that may publish
on one instance's topics never speak for another.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import anyio
import numpy as np
from anyio.abc import TaskGroup
from pydantic import ValidationError

from lmcache_core.config import LMCacheSettings
from lmcache_core.controller.errors import (
    BadWorkerReplyError,
    TooManyTokensError,
    UnknownInstanceError,
    UnknownWorkerError,
    WorkerUnavailableError,
)
from lmcache_core.controller.index import KVIndex
from lmcache_core.controller.layout import LayoutTable
from lmcache_core.controller.metrics import ControllerMetrics
from lmcache_core.controller.models import (
    CheckFinishResponse,
    ClearResponse,
    HealthResponse,
    InstanceInfo,
    LocationInfo,
    WorkerInfo,
)
from lmcache_core.errors import LMCacheError, NoResponders, RequestTimeout, TransportError, UnknownLocationError
from lmcache_core.events import EventKind
from lmcache_core.keys import HASH_SCHEME, TokenHasher, as_token_array
from lmcache_core.transport import Message, MessageBus, Subscription
from lmcache_core.wire import (
    EVENTS_WILDCARD,
    GOODBYE_WILDCARD,
    HEARTBEAT_WILDCARD,
    HELLO_TOPIC,
    LEGACY_REGISTER_TOPIC,
    PEER_LOOKUP_WILDCARD,
    PROTOCOL_VERSION,
    REGISTER_WILDCARD,
    ClearCommand,
    CommandReply,
    CommandRequest,
    EventBatch,
    HashingParams,
    Heartbeat,
    Hello,
    PeerLookupRequest,
    PingCommand,
    RegistrationAck,
    ReplayCommand,
    ResyncCommand,
    WireModel,
    WorkerIdentity,
    WorkerRegistration,
    command_topic,
    events_topic,
    goodbye_topic,
    heartbeat_topic,
    hello_topic,
    peer_lookup_topic,
    register_topic,
)

log = logging.getLogger(__name__)

#: scheme ids the controller can reproduce (see lmcache_core.keys)
SUPPORTED_SCHEMES = frozenset({HASH_SCHEME})
#: events of each kind remembered for /check_finish (oldest forgotten first)
EVENT_HISTORY = 65_536
#: fewest seconds between two hellos the controller sends to one unknown worker
HELLO_MIN_INTERVAL = 1.0
#: unknown workers whose last hello time is remembered (beyond it, the oldest are forgotten)
_HELLO_MEMORY = 4096
#: batches held per location while an earlier one is missing (more: left to the replay)
MAX_HELD_BATCHES = 64
#: replays answered for one gap that still did not close it before a resync is asked for
REPLAYS_BEFORE_RESYNC = 2

HashingKey = tuple[str, int, str]  # scheme, chunk_size, namespace
_Claim = TypeVar("_Claim", bound=WorkerIdentity)


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
    #: a resync was asked for (or a registration promised one): only a reset batch applies
    awaiting_reset: bool = True


@dataclass
class WorkerState:
    """One registered worker (one rank of one instance)."""

    registration: WorkerRegistration
    hashing: HashingKey
    locations: dict[str, LocationState]
    registered_at: float
    last_seen: float  # monotonic
    last_heartbeat_time: float = 0.0  # unix

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


@dataclass
class _Group:
    """Workers that hash tokens the same way; a lookup hashes once per group."""

    hasher: TokenHasher
    workers: set[tuple[str, int]] = field(default_factory=set)


class Controller:
    """Registry of workers and their KV index, plus the operations the HTTP API exposes."""

    def __init__(
        self,
        settings: LMCacheSettings,
        bus: MessageBus,
        index: KVIndex | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.index = index if index is not None else KVIndex()
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        self.metrics.watch(self._metrics_snapshot)
        self.events = EventLog()
        self.workers: dict[tuple[str, int], WorkerState] = {}
        self.instances: dict[str, dict[int, WorkerState]] = {}
        #: holder id -> what lookups need about it, precomputed so the hot loop reads tuples
        self._holders: dict[int, HolderMeta] = {}
        self._groups: dict[HashingKey, _Group] = {}
        #: what lookups need about every live holder, as arrays
        self._layout = LayoutTable()
        self._subscriptions: list[Subscription] = []
        self._events_subscription: Subscription | None = None
        #: event-batch messages handled so far, and an event set when that count moves
        self._events_handled = 0
        self._events_progress: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        #: (instance, rank, epoch) of an unknown run -> when it was last asked to register
        self._asked: OrderedDict[tuple[str, int, str], float] = OrderedDict()
        #: rank -> epoch of its latest refused registration (one entry per rank at most)
        self._refused: dict[tuple[str, int], str] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, tg: TaskGroup) -> None:
        """Subscribe to the workers' topics, start housekeeping in ``tg``, and say hello."""
        self._tg = tg
        bus = self.bus
        self._events_subscription = await bus.subscribe(EVENTS_WILDCARD, self._on_events)
        self._subscriptions = [
            await bus.subscribe(REGISTER_WILDCARD, self._on_register),
            await bus.subscribe(LEGACY_REGISTER_TOPIC, self._on_legacy_register),
            self._events_subscription,
            await bus.subscribe(HEARTBEAT_WILDCARD, self._on_heartbeat),
            await bus.subscribe(GOODBYE_WILDCARD, self._on_goodbye),
            await bus.subscribe(PEER_LOOKUP_WILDCARD, self._on_peer_lookup),
        ]
        bus.on_reconnect(self._say_hello)  # batches may have been lost while we were away
        await bus.flush()
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

    async def _say_hello(self) -> None:
        """Ask every worker to register again and resync (a restarted controller recovers)."""
        try:
            await self.bus.publish(HELLO_TOPIC, Hello().encode())
        except TransportError as exc:
            log.warning("cannot publish controller.hello: %s", exc)

    async def _ask_to_register(self, ident: WorkerIdentity) -> None:
        """Ask one run of one worker, and nobody else, to register again (at most once a second)."""
        run = (ident.instance_id, ident.worker_id, ident.epoch)
        now = time.monotonic()
        if now - self._asked.get(run, -HELLO_MIN_INTERVAL) < HELLO_MIN_INTERVAL:
            return
        self._asked[run] = now
        self._asked.move_to_end(run)
        while len(self._asked) > _HELLO_MEMORY:
            self._asked.popitem(last=False)
        topic = hello_topic(ident.instance_id, ident.worker_id)
        try:
            await self.bus.publish(topic, Hello(epoch=ident.epoch).encode())
        except TransportError as exc:
            log.warning("cannot publish %s: %s", topic, exc)

    async def _housekeeping(self) -> None:
        """Drop workers whose heartbeats stopped."""
        timeout = self.settings.controller_heartbeat_timeout
        period = min(max(timeout / 10, 0.02), 0.5)
        while True:
            await anyio.sleep(period)
            self.expire_workers(time.monotonic() - timeout)

    def expire_workers(self, deadline: float) -> list[str]:
        """Remove every worker last seen before ``deadline`` (monotonic); returns their names."""
        dead = [w for w in self.workers.values() if w.last_seen < deadline]
        for worker in dead:
            started = time.perf_counter()
            self._forget_worker(worker)
            self.metrics.worker_removal_seconds.observe(time.perf_counter() - started)
            self.metrics.workers_expired.inc()
            log.warning("worker %s missed its heartbeats; removed from the index", worker.name)
        return [w.name for w in dead]

    def _forget_worker(self, worker: WorkerState) -> None:
        for loc in worker.locations.values():
            self.index.remove_holder(loc.holder)
            self._holders.pop(loc.holder, None)
            self._layout.drop_holder(loc.holder)
        key = (worker.instance_id, worker.worker_id)
        self.workers.pop(key, None)
        ranks = self.instances.get(worker.instance_id)
        if ranks is not None:
            ranks.pop(worker.worker_id, None)
            if not ranks:
                del self.instances[worker.instance_id]
        self._describe_instance(worker.instance_id)
        group = self._groups.get(worker.hashing)
        if group is not None:
            group.workers.discard(key)
            if not group.workers:
                del self._groups[worker.hashing]

    # --- bus handlers ------------------------------------------------------------------------
    async def _on_register(self, msg: Message) -> None:
        try:
            reg = WorkerRegistration.decode(msg.payload)
        except ValidationError as exc:
            await self._respond(msg, RegistrationAck(accepted=False, detail=f"bad registration: {exc}", resync=False))
            return
        if not self._claims_its_topic(msg, register_topic(reg.instance_id, reg.worker_id), "registration", reg):
            detail = f"a registration on '{msg.topic}' must be of the instance and rank it names"
            await self._respond(msg, RegistrationAck(accepted=False, resync=False, detail=detail))
            return
        ack = self.register(reg)
        await self._respond(msg, ack)

    async def _on_legacy_register(self, msg: Message) -> None:
        """Protocol 2 and older registered here: say why they are not heard."""
        detail = (
            f"this controller speaks protocol {PROTOCOL_VERSION}: workers register on "
            f"'register.<instance>.<rank>'; upgrade lmcache-core on this instance"
        )
        log.warning("refused a registration on '%s' (an older protocol)", msg.topic)
        await self._respond(msg, RegistrationAck(accepted=False, resync=False, detail=detail))

    def _decode_claim(
        self, msg: Message, model: type[_Claim], topic_of: Callable[[str, int], str], what: str
    ) -> _Claim | None:
        """``msg`` as ``model`` when it parses and names the worker its topic names; else None
        (logged)."""
        try:
            claim = model.decode(msg.payload)
        except ValidationError as exc:
            log.warning("ignoring a malformed %s on %s: %s", what, msg.topic, exc)
            return None
        if not self._claims_its_topic(msg, topic_of(claim.instance_id, claim.worker_id), what, claim):
            return None
        return claim

    def _claims_its_topic(self, msg: Message, expected: str, what: str, claim: Any) -> bool:
        """Whether ``msg`` arrived on the topic of the identity it claims; logs a refusal if not."""
        if msg.topic == expected:
            return True
        self.metrics.identity_refused.labels(what).inc()
        log.warning(
            "refused the %s on '%s': it claims to be %s/%s, whose topic is '%s'",
            what, msg.topic, claim.instance_id, claim.worker_id, expected,
        )
        return False

    async def _respond(self, msg: Message, model: WireModel) -> None:
        try:
            await msg.respond(model.encode())
        except TransportError as exc:
            log.warning("cannot answer on %s: %s", msg.topic, exc)

    def register(self, reg: WorkerRegistration) -> RegistrationAck:
        """Record a worker (a new epoch empties what it held); the ack asks for its inventory."""
        key = (reg.instance_id, reg.worker_id)
        old = self.workers.get(key)
        now = time.monotonic()
        refusal = None
        if reg.version != PROTOCOL_VERSION:
            refusal = f"protocol version {reg.version} is not supported; this controller speaks {PROTOCOL_VERSION}"
        elif reg.hashing.scheme not in SUPPORTED_SCHEMES:
            refusal = f"hash scheme '{reg.hashing.scheme}' is not supported; known: {', '.join(sorted(SUPPORTED_SCHEMES))}"
        elif (
            old is not None
            and old.epoch != reg.epoch
            and now - old.last_seen < self.settings.controller_heartbeat_timeout
        ):
            running = old.registration
            refusal = (
                f"instance id '{reg.instance_id}' rank {reg.worker_id} belongs to a running worker "
                f"(host {running.host or '?'}, pid {running.pid}); give each instance its own "
                "lmcache_instance_id (this one is retried, and accepted once that worker is gone)"
            )
        if refusal is not None:
            if self._refused.get(key) != reg.epoch:  # once per run, not once per retry
                log.error(
                    "refused worker %s/%d (epoch %s, host %s, pid %d): %s",
                    reg.instance_id, reg.worker_id, reg.epoch, reg.host or "?", reg.pid, refusal,
                )
            self._refused[key] = reg.epoch  # its heartbeats must not make it register again
            return RegistrationAck(accepted=False, resync=False, detail=refusal)
        self._refused.pop(key, None)
        hashing: HashingKey = (reg.hashing.scheme, reg.hashing.chunk_size, reg.hashing.namespace)
        if old is not None and old.epoch == reg.epoch and old.hashing == hashing:
            # the same run registering again (hello, reconnect): keep what is applied, but it
            # will resync, so wait for the reset
            kept = {name: old.locations[name] for name in reg.locations if name in old.locations}
            for name, loc in old.locations.items():
                if name not in kept:
                    self.index.remove_holder(loc.holder)
                    self._holders.pop(loc.holder, None)
                    self._layout.drop_holder(loc.holder)
            for loc in kept.values():
                loc.awaiting_reset = True
            locations = {name: kept.get(name) or self._new_location(reg, name) for name in reg.locations}
            for position, loc in enumerate(locations.values()):
                loc.position = position
        else:
            if old is not None:
                self._forget_worker(old)
            locations = {name: self._new_location(reg, name) for name in reg.locations}
            for position, loc in enumerate(locations.values()):
                loc.position = position
        worker = WorkerState(
            registration=reg,
            hashing=hashing,
            locations=locations,
            registered_at=time.time(),
            last_seen=now,
            last_heartbeat_time=old.last_heartbeat_time if old is not None else 0.0,
        )
        self.workers[key] = worker
        self.instances.setdefault(reg.instance_id, {})[reg.worker_id] = worker
        self._describe_instance(reg.instance_id)
        for loc in locations.values():
            self._holders[loc.holder] = HolderMeta(
                worker, loc, reg.instance_id, key, reg.model_name, loc.name, loc.position
            )
            self._layout.set_holder(loc.holder, reg.instance_id, reg.worker_id, reg.model_name, loc.position)
        group = self._groups.get(hashing)
        if group is None:
            group = self._groups[hashing] = _Group(TokenHasher(reg.hashing.chunk_size, reg.hashing.namespace))
        group.workers.add(key)
        self.metrics.registrations.inc()
        log.info("worker %s registered (epoch %s, locations %s)", worker.name, reg.epoch, list(locations))
        return RegistrationAck(accepted=True, resync=True)

    async def _on_goodbye(self, msg: Message) -> None:
        ident = self._decode_claim(msg, WorkerIdentity, goodbye_topic, "goodbye")
        if ident is not None:
            self.goodbye(ident)

    async def _on_peer_lookup(self, msg: Message) -> None:
        from lmcache_core.controller.peers import find_peer

        request = self._decode_claim(msg, PeerLookupRequest, peer_lookup_topic, "peer lookup")
        if request is not None:
            await self._respond(msg, find_peer(self, request))

    async def move_between_instances(
        self, tokens: list[int], source: tuple[str, str], target: tuple[str, str | None], copy: bool
    ) -> dict[int, int]:
        """Move (or copy) the stored prefix of ``tokens`` from one instance's location to another
        instance over the peer channel; tokens moved per rank (``controller.peers``)."""
        from lmcache_core.controller.peers import move_between_instances

        return await move_between_instances(self, tokens, source, target, copy)

    def goodbye(self, ident: WorkerIdentity) -> bool:
        """A worker stopped cleanly: it leaves the index now; whether it was registered.

        Only the run named leaves: a refused duplicate's goodbye never removes the running one.
        """
        key = (ident.instance_id, ident.worker_id)
        if self._refused.get(key) == ident.epoch:
            del self._refused[key]
        worker = self.workers.get(key)
        if worker is None or worker.epoch != ident.epoch:
            return False
        self._forget_worker(worker)
        self.metrics.workers_left.inc()
        log.info("worker %s stopped; removed from the index", worker.name)
        return True

    def _describe_instance(self, instance_id: str) -> None:
        """Tell the layout table an instance's world size and location names (rank 0's, or the lowest rank's)."""
        ranks = self.instances.get(instance_id)
        if not ranks:
            self._layout.set_instance(instance_id, 0, [])
            return
        first = ranks[min(ranks)]
        self._layout.set_instance(instance_id, first.registration.world_size, list(first.locations))

    def _new_location(self, reg: WorkerRegistration, name: str) -> LocationState:
        holder = self.index.holder_id(reg.instance_id, reg.worker_id, name)
        self.index.clear_holder(holder)  # a previous run's leftovers must not be credited
        return LocationState(name=name, holder=holder)

    async def _on_events(self, msg: Message) -> None:
        try:
            self._handle_events(msg)
        finally:
            self._events_handled += 1
            if self._events_progress is not None:
                self._events_progress.set()
                self._events_progress = None

    async def _received_events_handled(self) -> None:
        """Wait until every event batch this controller has received so far was handled, so a
        gap is judged by what arrived, not by how far behind the handler is (a backlog after a
        restart must not look like a loss and ask for inventories that are already on the way)."""
        sub = self._events_subscription
        if sub is None:
            return
        timeout = self.settings.controller_heartbeat_timeout
        with anyio.move_on_after(timeout):
            try:
                await self.bus.flush(timeout)  # what the server sent before this is now queued
            except TransportError:
                return
            target = self._events_handled + sub.pending()
            while self._events_handled < target:
                if self._events_progress is None:
                    self._events_progress = anyio.Event()
                await self._events_progress.wait()

    def _handle_events(self, msg: Message) -> None:
        try:
            batch = EventBatch.decode(msg.payload)
            arrays = batch.arrays()
        except (ValidationError, ValueError) as exc:
            self.metrics.batches_ignored.labels("malformed").inc()
            log.warning("ignoring a malformed event batch on %s: %s", msg.topic, exc)
            return
        if not self._claims_its_topic(msg, events_topic(batch.instance_id, batch.worker_id), "event batch", batch):
            self.metrics.batches_ignored.labels("identity").inc()
            return
        self.apply_batch(batch, arrays)

    def apply_batch(
        self, batch: EventBatch, arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ) -> bool:
        """Apply one batch if it is the next in its sequence (then the held batches it was
        holding up); hold one that is ahead of a missing one. Returns whether it was applied."""
        if batch.version != PROTOCOL_VERSION:
            self.metrics.batches_ignored.labels("protocol_version").inc()
            return False
        worker = self.workers.get((batch.instance_id, batch.worker_id))
        if worker is None or worker.epoch != batch.epoch:
            self.metrics.batches_ignored.labels("unknown_worker").inc()
            return False
        loc = worker.locations.get(batch.location)
        if loc is None:
            self.metrics.batches_ignored.labels("unknown_location").inc()
            return False
        if batch.seq <= loc.applied_seq:
            self.metrics.batches_ignored.labels("stale").inc()
            return False
        arrays = arrays if arrays is not None else batch.arrays()
        loc.known_seq = max(loc.known_seq, batch.seq)
        if batch.reset or (not loc.awaiting_reset and batch.seq == loc.applied_seq + 1):
            self._apply(loc, batch, arrays)
            self._drain(worker, loc)
            return True
        # ahead of a missing batch (or of the awaited reset): it waits for what comes before it
        if batch.seq in loc.held:
            self.metrics.batches_ignored.labels("duplicate").inc()
        elif len(loc.held) >= MAX_HELD_BATCHES:
            self.metrics.batches_ignored.labels("held_full").inc()  # the replay sends it again
        else:
            loc.held[batch.seq] = (batch, arrays)
            self.metrics.batches_held.inc()
        self._note_gap(worker, loc)
        return False

    def _apply(
        self, loc: LocationState, batch: EventBatch, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> None:
        kinds, hashes, tokens = arrays
        if batch.reset:
            self.index.clear_holder(loc.holder)
            loc.awaiting_reset = False
        if len(kinds):
            if kinds[0] == EventKind.ADMIT and (kinds == EventKind.ADMIT).all():
                self.index.admit(loc.holder, hashes, tokens)  # the common batch: admits only
            else:
                self.index.apply(loc.holder, kinds, hashes, tokens)
        loc.applied_seq = batch.seq
        self.metrics.events_applied.inc(len(kinds))

    def _drain(self, worker: WorkerState, loc: LocationState) -> None:
        """Apply the held batches that are next in order now; close or keep the gap."""
        held = loc.held
        for seq in [s for s in held if s <= loc.applied_seq]:
            del held[seq]  # covered by a reset or a clear
        while not loc.awaiting_reset and (nxt := held.pop(loc.applied_seq + 1, None)) is not None:
            self._apply(loc, *nxt)
            self.metrics.late_batches_applied.inc()
        if loc.known_seq > loc.applied_seq:
            self._note_gap(worker, loc)
        else:
            loc.gap_since = None

    def _note_gap(self, worker: WorkerState, loc: LocationState) -> None:
        """Start the grace period of a gap, unless one runs already."""
        if loc.gap_since is not None:
            return
        loc.gap_since = time.monotonic()
        self.metrics.seq_gaps.inc()
        if self._tg is not None:
            self._tg.start_soon(self._mend_gap, worker, loc, loc.gap_since)

    async def _mend_gap(self, worker: WorkerState, loc: LocationState, since: float) -> None:
        """Once a gap has stood for the grace period: replay the range (resync when it is no
        longer retained, or replays did not close it), and again after each repair's own grace
        period until it closes."""
        grace = self.settings.controller_gap_grace
        key = (worker.instance_id, worker.worker_id)
        replayed = 0
        await anyio.sleep(grace)
        while True:
            await self._received_events_handled()  # a backlog is not a gap
            if loc.gap_since != since:
                return
            worker = self.workers.get(key)  # a registration of the same run keeps its locations
            if worker is None or worker.locations.get(loc.name) is not loc:
                return  # it left, or a new run started afresh
            log.info(
                "%s at %s: batches %d..%d missing for %.1f s",
                worker.name, loc.name, loc.applied_seq + 1, loc.known_seq, time.monotonic() - since,
            )
            if loc.awaiting_reset or replayed >= REPLAYS_BEFORE_RESYNC:
                await self._resync(worker, loc)  # replays that did not close it: start afresh
            else:
                replayed += await self._replay(worker, loc)
            await anyio.sleep(grace)  # what the repair sent may still be on its way

    async def _replay(self, worker: WorkerState, loc: LocationState) -> bool:
        """Ask the worker to publish the missing range again; False when it could not (a
        range no longer retained falls back to a resync of that location)."""
        self.metrics.replays.inc()
        command = ReplayCommand(location=loc.name, first_seq=loc.applied_seq + 1, last_seq=loc.known_seq)
        reply = await self._tracked_command(worker, command, "replay")
        if reply is not None and reply.error_kind == "not_retained":
            log.info("%s no longer retains %s batches %d..: resyncing", worker.name, loc.name, command.first_seq)
            await self._resync(worker, loc)
        return reply is not None and reply.ok

    async def _on_heartbeat(self, msg: Message) -> None:
        beat = self._decode_claim(msg, Heartbeat, heartbeat_topic, "heartbeat")
        if beat is not None:
            await self.heartbeat(beat)

    async def heartbeat(self, beat: Heartbeat) -> None:
        """Note a worker is alive; resync locations whose announced batches never arrived."""
        worker = self.workers.get((beat.instance_id, beat.worker_id))
        if worker is None or worker.epoch != beat.epoch:
            # a run we do not know (we restarted, or dropped it while it was unreachable): it
            # alone registers again; one we refused (a duplicate) is not asked
            if self._refused.get((beat.instance_id, beat.worker_id)) != beat.epoch:
                await self._ask_to_register(beat)
            return
        worker.last_seen = time.monotonic()
        worker.last_heartbeat_time = time.time()
        for name, loc in worker.locations.items():
            # the batches announced may only be delayed: the gap's grace period decides
            loc.known_seq = max(loc.known_seq, beat.last_seq.get(name, 0))
            if loc.known_seq > loc.applied_seq:
                self._note_gap(worker, loc)

    async def _resync(self, worker: WorkerState, loc: LocationState) -> None:
        """Ask for one location's whole inventory (only its reset batch applies meanwhile)."""
        loc.awaiting_reset = True
        self.metrics.resyncs.inc()
        await self._tracked_command(worker, ResyncCommand(locations=[loc.name]), "resync")

    async def _tracked_command(self, worker: WorkerState, command: Any, kind: str) -> CommandReply | None:
        """Send a command under a ``/check_finish`` id of ``kind``; its reply (None: no answer)."""
        event_id = self.events.start(kind)
        try:
            reply = await self._command(worker, command, event_id)
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            log.warning("%s of %s failed: %s", kind, worker.name, exc)
            return None
        self.events.finish(event_id, ok=reply.ok, detail=reply.error)
        return reply

    # --- commands ----------------------------------------------------------------------------
    async def _command(self, worker: WorkerState, command: Any, event_id: str) -> CommandReply:
        """Send one command to one worker and read its reply."""
        timeout = self.settings.controller_command_timeout
        # past this the worker drops it: a command we gave up on is never carried out later
        payload = CommandRequest(event_id=event_id, command=command, deadline=time.time() + timeout).encode()
        topic = command_topic(worker.instance_id, worker.worker_id)
        try:
            # the outer bound keeps a misbehaving transport from hanging the request
            with anyio.fail_after(timeout + 1.0):
                raw = await self.bus.request(topic, payload, timeout)
        except (RequestTimeout, TimeoutError) as exc:
            raise WorkerUnavailableError(
                f"worker {worker.name} did not answer within {timeout:g} s"
            ) from exc
        except NoResponders as exc:
            raise WorkerUnavailableError(
                f"worker {worker.name} is not listening (no responders on its command topic)"
            ) from exc
        except TransportError as exc:
            raise WorkerUnavailableError(f"cannot reach worker {worker.name}: {exc}") from exc
        try:
            reply = CommandReply.decode(raw)
        except ValidationError as exc:
            raise BadWorkerReplyError(f"worker {worker.name} sent an unreadable reply: {exc}") from exc
        if (reply.instance_id, reply.worker_id) != (worker.instance_id, worker.worker_id):
            log.warning("refused a reply on '%s' from %s/%s", topic, reply.instance_id, reply.worker_id)
            raise BadWorkerReplyError(
                f"worker {worker.name} was answered for by {reply.instance_id}/{reply.worker_id}"
            )
        return reply

    async def _fan_out(
        self, ranks: list[WorkerState], command: Any, event_id: str
    ) -> tuple[dict[int, CommandReply], dict[int, LMCacheError]]:
        """Send ``command`` to every rank concurrently; replies and errors per rank."""
        replies: dict[int, CommandReply] = {}
        errors: dict[int, LMCacheError] = {}

        async def one(worker: WorkerState) -> None:
            try:
                replies[worker.worker_id] = await self._command(worker, command, event_id)
            except LMCacheError as exc:
                errors[worker.worker_id] = exc

        async with anyio.create_task_group() as tg:
            for worker in ranks:
                tg.start_soon(one, worker)
        return replies, errors

    def _ranks(self, instance_id: str) -> list[WorkerState]:
        ranks = self.instances.get(instance_id)
        if not ranks:
            raise UnknownInstanceError(instance_id, self.instances)
        return [ranks[r] for r in sorted(ranks)]

    def instance_locations(self, instance_id: str) -> list[str]:
        """Location names of an instance, fastest first (every rank's, in registration order)."""
        names: dict[str, None] = {}
        for worker in self._ranks(instance_id):
            for name in worker.locations:
                names.setdefault(name, None)
        return list(names)

    async def clear(self, instance_id: str, location: str) -> ClearResponse:
        """Empty ``location`` on every rank of an instance; the index forgets it before returning."""
        ranks = self._ranks(instance_id)
        available = self.instance_locations(instance_id)
        if location not in available:
            raise UnknownLocationError(location, available)
        event_id = self.events.start("clear")
        try:
            replies, errors = await self._fan_out(ranks, ClearCommand(location=location), event_id)
            if errors:
                raise WorkerUnavailableError(
                    f"clear of '{location}' on instance '{instance_id}' failed: "
                    + "; ".join(str(errors[r]) for r in sorted(errors))
                )
            for rank, reply in sorted(replies.items()):
                if not reply.ok:
                    if reply.error_kind == "unknown_location":
                        raise UnknownLocationError(location, reply.available_locations or [])
                    raise BadWorkerReplyError(
                        f"worker {instance_id}/{rank} could not clear '{location}': {reply.error}"
                    )
            per_rank: dict[int, int] = {}
            for rank, reply in replies.items():
                per_rank[rank] = int(reply.num_tokens or 0)
                self._apply_clear(instance_id, rank, location, reply)
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            raise
        self.events.finish(event_id)
        differ = len(set(per_rank.values())) > 1
        return ClearResponse(
            event_id=event_id,
            num_tokens=sum(per_rank.values()),
            num_tokens_per_worker=dict(sorted(per_rank.items())) if differ else None,
        )

    def _apply_clear(self, instance_id: str, rank: int, location: str, reply: CommandReply) -> None:
        """Forget what a clear removed, unless the batch holding the clear is applied already."""
        worker = self.workers.get((instance_id, rank))
        if worker is None or (reply.epoch and reply.epoch != worker.epoch):
            return  # the worker left or restarted meanwhile; its registration reset everything
        loc = worker.locations.get(location)
        if loc is None:
            return
        last = (reply.last_seq or {}).get(location)
        if last is not None and loc.applied_seq >= last:
            return  # the clear event already came through the event stream
        self.index.clear_holder(loc.holder)
        if last is not None:
            # batches before the one holding the clear are covered by it
            loc.applied_seq = max(loc.applied_seq, last - 1)
            loc.known_seq = max(loc.known_seq, last)
            self._drain(worker, loc)

    async def health(self, instance_id: str) -> HealthResponse:
        """Ping every rank of an instance."""
        ranks = self._ranks(instance_id)
        event_id = self.events.start("health")
        replies, errors = await self._fan_out(ranks, PingCommand(), event_id)
        codes = {w.worker_id: 0 for w in ranks}
        messages: dict[int, str] = {}
        for rank, exc in errors.items():
            codes[rank] = 1
            messages[rank] = str(exc)
        for rank, reply in replies.items():
            if not reply.ok:
                codes[rank] = 1
                messages[rank] = reply.error or "worker reported an error"
        self.events.finish(event_id, ok=not messages, detail="; ".join(messages.values()) or None)
        return HealthResponse(event_id=event_id, error_codes=dict(sorted(codes.items())), errors=messages)

    def check_finish(self, event_id: str) -> CheckFinishResponse | None:
        """The status of an event id this controller handed out; None when unknown (or forgotten)."""
        record = self.events.get(event_id)
        if record is None:
            return None
        return CheckFinishResponse(
            event_id=event_id, status=record.status, kind=record.kind, detail=record.detail  # type: ignore[arg-type]
        )

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
            instance_id=reg.instance_id,
            worker_id=reg.worker_id,
            world_size=reg.world_size,
            epoch=reg.epoch,
            model_name=reg.model_name,
            kv_dtype=reg.kv_dtype,
            hashing=HashingParams(
                scheme=worker.hashing[0], chunk_size=worker.hashing[1], namespace=worker.hashing[2]
            ),
            host=reg.host,
            pid=reg.pid,
            peer_init_url=reg.peer_init_url,
            locations=locations,
            registration_time=worker.registered_at,
            last_heartbeat_time=worker.last_heartbeat_time,
            seconds_since_heartbeat=round(time.monotonic() - worker.last_seen, 3),
        )

    def worker_infos(self, instance_id: str, worker_ids: list[int] | None = None) -> list[WorkerInfo]:
        """The given ranks of an instance (every rank when None); unknown ones raise ``UnknownWorkerError``."""
        ranks = {w.worker_id: w for w in self._ranks(instance_id)}
        wanted = sorted(ranks) if worker_ids is None else list(dict.fromkeys(worker_ids))
        missing = [r for r in wanted if r not in ranks]
        if missing:
            raise UnknownWorkerError(instance_id, missing, ranks)
        return [self.worker_info(ranks[r]) for r in wanted]

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

    def _metrics_snapshot(self) -> dict[str, Any]:
        locations: dict[str, tuple[int, int]] = {}
        for meta in self._holders.values():
            loc = meta.loc
            chunks, tokens = self.index.holder_stats(loc.holder)
            old = locations.get(loc.name, (0, 0))
            locations[loc.name] = (old[0] + chunks, old[1] + tokens)
        return {
            "workers": len(self.workers),
            "instances": len(self.instances),
            "locations": locations,
            "entries": self.index.num_entries(),
        }
