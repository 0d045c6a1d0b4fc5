"""The controller worker: an instance's side of the worker <-> controller protocol.

``start_worker(engine)`` starts one background thread running an anyio event loop (a blocking
portal) whose task group owns every task. The worker

* registers with the controller (``WorkerRegistration``), retrying with backoff while no
  controller answers; a version-5 controller then pulls the inventory per location in pages
  (``inventory`` commands, answered from a snapshot), an ack asking for it has it published
  (a resync, ``reset=True``);
* turns the engine's admit/evict/clear events into ordered ``EventBatch``es, one sequence of
  batch numbers per location; the engine's callback only appends to a deque, so the engine is
  never slowed by the bus;
* heartbeats with the last batch number and chunk count per location;
* retains its recent batches (``worker_replay_batches`` / ``worker_replay_bytes``) and publishes
  a range again on a ``replay`` command ('not_retained' when it is gone: the controller resyncs);
* answers ``clear``, ``lookup``, ``resync``, ``replay``, ``inventory``, ``ping``, ``pin``,
  ``unpin``, ``move`` and ``recode`` commands on its command topic, and carries none out after
  its deadline (it answers 'expired' and logs it);
* re-registers when a controller says hello (to every worker, or to this run on
  its own hello topic) and after a transport reconnect;
* says goodbye when it stops cleanly, so the controller drops its entries at once.

Transport errors are logged and retried: the worker never takes the engine down.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from itertools import repeat, starmap
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal, start_blocking_portal
from pydantic import ValidationError

from lmcache_core.codecs import CodecError, UnknownCodecError
from lmcache_core.errors import LMCacheError, NoResponders, RequestTimeout, UnknownLocationError
from lmcache_core.events import EventKind, KVEvent
from lmcache_core.inventory import InventorySnapshots, SnapshotGone
from lmcache_core.keys import HASH_SCHEME
from lmcache_core.retained import RetainedBatches
from lmcache_core.transport import Message, MessageBus
from lmcache_core.wire import (
    HELLO_TOPIC,
    PROTOCOL_VERSION,
    ChunksCommand,
    ClearCommand,
    RecodeCommand,
    CommandReply,
    CommandRequest,
    EventBatch,
    HashingParams,
    Heartbeat,
    Hello,
    InventoryCommand,
    LookupCommand,
    PingCommand,
    PushCommand,
    RegistrationAck,
    ReplayCommand,
    ResyncCommand,
    WorkerIdentity,
    WorkerRegistration,
    command_topic,
    events_topic,
    goodbye_topic,
    heartbeat_topic,
    hello_topic,
    register_topic,
)
from lmcache_core.worker_address import worker_address

if TYPE_CHECKING:
    from lmcache_core.engine import CacheEngine
    from lmcache_core.p2p.peer import PeerAgent

log = logging.getLogger(__name__)

#: LMCache keys that a message bus makes unnecessary (accepted, then ignored)
UNUSED_COMPAT_KEYS = (
    "distributed_url",
    "lmcache_worker_port",
    "lmcache_worker_ports",
    "p2p_host",
    "p2p_init_ports",
)

_MAX_BATCHES_PER_ROUND = 64  # bounds one publishing round so commands and heartbeats interleave
_MAX_BACKOFF = 2.0
_REGISTER_TIMEOUT = 2.0
_CLOSE_TIMEOUT = 5.0

_kind_of = attrgetter("kind")
_location_of = attrgetter("location")
_tokens_of = attrgetter("num_tokens")
_key_of = attrgetter("key")
_hash_of = attrgetter("chunk_hash")


def log_unused_compat_keys(settings: Any) -> list[str]:
    """Log one INFO line naming the LMCache keys that are set but unused; returns their names."""
    try:
        p2p = ("p2p_host", "p2p_init_ports") if getattr(settings, "enable_p2p", False) else ()
        found = [
            key for key in UNUSED_COMPAT_KEYS if key not in p2p and getattr(settings, key, None) is not None
        ]
        if found:
            log.info(
                "config keys %s are accepted for LMCache compatibility but not needed: workers "
                "reach the controller through the message bus at controller_url",
                ", ".join(found),
            )
        return found
    except Exception:  # an informational line must never stop an instance from starting
        return []


def pack_events(events: list[KVEvent]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pack events into ``(kinds, hashes, tokens)`` arrays per location, keeping their order.

    Works column by column with C-level iteration (``map`` over attribute getters into
    ``np.fromiter``) so no Python object is made per event.
    """
    n = len(events)
    if n == 0:
        return {}
    kinds = np.fromiter(map(_kind_of, events), dtype=np.uint8, count=n)
    tokens = np.fromiter(map(_tokens_of, events), dtype="<u4", count=n)
    keys = list(map(_key_of, events))
    if (kinds == EventKind.CLEAR).any():  # rare: clear events carry no key
        hashes = np.fromiter(
            (0 if key is None else key.chunk_hash for key in keys), dtype="<u8", count=n
        )
    else:
        hashes = np.fromiter(map(_hash_of, keys), dtype="<u8", count=n)
    locations = list(map(_location_of, events))
    first = locations[0]
    if locations.count(first) == n:
        return {first: (kinds, hashes, tokens)}
    names = list(dict.fromkeys(locations))
    ids = {name: i for i, name in enumerate(names)}
    loc_ids = np.fromiter(map(ids.__getitem__, locations), dtype=np.int32, count=n)
    out = {}
    for i, name in enumerate(names):
        where = np.flatnonzero(loc_ids == i)
        out[name] = (kinds[where], hashes[where], tokens[where])
    return out


class WorkerHandle:
    """A running worker. ``close()`` stops it; the other methods are for operators and tests."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine
        self.settings = engine.settings
        meta = engine.metadata
        self.identity = WorkerIdentity(
            instance_id=self.settings.lmcache_instance_id,
            worker_id=meta.worker_id,
            epoch=uuid.uuid4().hex,
        )
        self.url: str | None = self.settings.controller_address
        self.address = worker_address(self.settings, meta.worker_id)  # resolved once, off the loop
        self._pending: collections.deque[KVEvent] = collections.deque()
        self._seq: dict[str, int] = {}
        self._clear_seq: dict[str, int] = {}  # per location, the batch holding the latest clear
        self._retained = RetainedBatches(self.settings.worker_replay_batches, self.settings.worker_replay_bytes)
        self._snapshots = InventorySnapshots()
        self._started_at = time.time()
        #: events were dropped unsent (no bus) since the last accepted registration
        self._lost_events = False
        self._publish_failing = False
        self._registered = threading.Event()
        self.registrations = 0
        self._bus: MessageBus | None = None
        self._publish_lock: anyio.Lock | None = None
        self._reregister: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._stop_requested = False
        self._tg: TaskGroup | None = None
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None
        self._future: Future[None] | None = None
        #: the peer channel (``enable_p2p``), bound by ``start``
        self.peers: PeerAgent | None = None
        # the deque's own append is the callback: C code, no Python frame in the engine's path
        self._unsubscribe = engine.subscribe(self._pending.append)

    # --- public API ----------------------------------------------------------------------------
    @property
    def topic(self) -> str:
        """The command topic this worker answers on."""
        return command_topic(self.identity.instance_id, self.identity.worker_id)

    def registration(self) -> WorkerRegistration:
        """What this worker tells the controller about itself."""
        engine = self.engine
        meta = engine.metadata
        return WorkerRegistration(
            instance_id=self.identity.instance_id,
            worker_id=self.identity.worker_id,
            epoch=self.identity.epoch,
            world_size=meta.world_size,
            model_name=meta.model_name,
            kv_dtype=meta.kv_dtype,
            hashing=HashingParams(
                scheme=HASH_SCHEME,
                chunk_size=engine.hasher.chunk_size,
                namespace=engine.hasher.namespace,
            ),
            locations=list(engine.locations),
            host=socket.gethostname(),
            pid=os.getpid(),
            ip=self.address.ip,
            port=self.address.port,
            peer_init_url=self.peers.url if self.peers is not None else None,
            started_at=self._started_at,
            lost_events=self._lost_events,
        )

    def last_seq(self) -> dict[str, int]:
        """The last batch number published per location."""
        return dict(self._seq)

    def wait_registered(self, timeout: float | None = None) -> bool:
        """Wait until the controller accepted a registration and the inventory was sent."""
        return self._registered.wait(timeout)

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    @property
    def connected(self) -> bool:
        bus = self._bus
        return bus is not None and bus.is_connected

    def sync(self, timeout: float = 5.0) -> bool:
        """Publish every event emitted so far and wait until the bus delivered it to the server.

        Returns False when that did not finish within ``timeout`` (not connected, for example).
        """
        portal = self._portal
        if portal is None:
            return False
        try:
            return bool(portal.call(self._sync, timeout))
        except Exception:
            return False

    def start(self) -> WorkerHandle:
        """Start the background thread (``start_worker`` calls this)."""
        log_unused_compat_keys(self.settings)
        if self.settings.enable_p2p:
            from lmcache_core.p2p.peer import PeerAgent

            self.peers = PeerAgent(self)  # binds now: a port in use fails the start
            self.engine.peer_fetch = self.peers.fetch_prefix
        self._portal = self._stack.enter_context(
            start_blocking_portal(name=f"lmcache-worker-{self.identity.worker_id}")
        )
        self._future = self._portal.start_task_soon(self._run)
        return self

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Publish what is pending (briefly), disconnect, join the thread; at most ``timeout``."""
        self._unsubscribe()
        if self.peers is not None:
            self.engine.peer_fetch = None
        portal, future = self._portal, self._future
        self._portal = None
        if portal is not None and future is not None and not future.done():
            try:
                portal.call(self._request_stop)
                future.result(timeout)
            except FutureTimeout:
                log.warning("worker did not stop within %.1fs; cancelling it", timeout)
                future.cancel()
            except Exception:
                pass
        self._stack.close()
        if self.peers is not None:  # after the loop stopped serving it (kept: its url and counters)
            self.peers.close()

    # --- lifecycle inside the event loop ---------------------------------------------------------
    def _request_stop(self) -> None:
        self._stop_requested = True  # read by _run if it has not started yet
        if self._stop is not None:
            self._stop.set()

    async def _run(self) -> None:
        self._stop = anyio.Event()
        if self._stop_requested:
            return
        self._publish_lock = anyio.Lock()
        self._reregister = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._connect_and_serve)
            if self.peers is not None:
                tg.start_soon(self.peers.server.serve)
            await self._stop.wait()
            # last chance for what the engine did just before closing to reach the controller
            with anyio.move_on_after(1.0):
                await self._sync(1.0)
            with anyio.move_on_after(1.0):
                await self._say_goodbye()
            tg.cancel_scope.cancel()

    async def _connect_and_serve(self) -> None:
        from lmcache_core.plugins import resolve_transport

        delay = 0.05
        warned = False
        while True:
            try:
                spec = resolve_transport(self.engine.pm, self.settings.transport)
                bus = await spec.connect(self.settings, self.url)
            except Exception as exc:  # no server yet, bad URL, missing plugin: keep trying
                if not warned:
                    log.warning(
                        "worker cannot reach the controller's bus at %s (retrying): %s",
                        self.url,
                        exc,
                    )
                    warned = True
                self._drop_pending_for_resync()
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            try:
                await self._serve(bus)
                return
            except Exception as exc:
                log.warning("worker lost its bus (reconnecting): %s", exc)
            finally:
                self._bus = None
                with anyio.move_on_after(2.0, shield=True):
                    try:
                        await bus.aclose()
                    except Exception:
                        pass
            await anyio.sleep(delay)

    async def _serve(self, bus: MessageBus) -> None:
        self._bus = bus
        log.info(
            "worker %s/%d connected to %s",
            self.identity.instance_id,
            self.identity.worker_id,
            self.url,
        )
        async with anyio.create_task_group() as tg:
            self._tg = tg
            bus.on_reconnect(self._on_reconnect)
            await bus.subscribe(self.topic, self._on_command)
            await bus.subscribe(HELLO_TOPIC, self._on_hello)
            await bus.subscribe(hello_topic(self.identity.instance_id, self.identity.worker_id), self._on_hello)
            tg.start_soon(self._publish_loop)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._registration_loop)

    def _drop_pending_for_resync(self) -> None:
        """Without a bus, pending events only grow; the registration resync replaces them."""
        if self._pending:
            self._lost_events = True  # the registration says so: the controller pulls everything
        self._pending.clear()

    # --- registration ------------------------------------------------------------------------
    async def _on_hello(self, msg: Message) -> None:
        try:
            hello = Hello.decode(msg.payload)
        except ValidationError:
            hello = Hello()  # an older controller's hello: meant for everyone
        if hello.epoch is not None and hello.epoch != self.identity.epoch:
            return  # meant for another run sharing this instance id and rank
        log.info("controller said hello; registering again")
        self._trigger_reregister()

    async def _say_goodbye(self) -> None:
        """Tell the controller this run stops, so it drops the entries now, not after a timeout."""
        bus = self._bus
        if bus is None or not self._registered.is_set():
            return
        topic = goodbye_topic(self.identity.instance_id, self.identity.worker_id)
        try:
            await bus.publish(topic, self.identity.encode())
            await bus.flush(1.0)
        except LMCacheError as exc:
            log.info("could not say goodbye to the controller: %s", exc)

    async def _on_reconnect(self) -> None:
        log.info("bus reconnected; registering again")
        self._trigger_reregister()

    def _trigger_reregister(self) -> None:
        if self._reregister is not None:
            self._reregister.set()

    async def _registration_loop(self) -> None:
        while True:
            self._reregister = anyio.Event()  # before registering, so a hello meanwhile is kept
            await self._register()
            await self._reregister.wait()

    async def _register(self) -> None:
        assert self._bus is not None and self._reregister is not None
        delay = 0.05
        quiet = False
        refusal = ""
        while True:
            try:
                reply = await self._bus.request(
                    register_topic(self.identity.instance_id, self.identity.worker_id),
                    self.registration().encode(),
                    timeout=_REGISTER_TIMEOUT,
                )
                ack = RegistrationAck.decode(reply)
            except (NoResponders, RequestTimeout) as exc:  # no controller yet: normal
                if not quiet:
                    log.info("no controller answers registration yet (retrying): %s", exc)
                    quiet = True
            except LMCacheError as exc:
                log.warning("registration failed (retrying): %s", exc)
            except ValidationError as exc:
                log.warning("controller sent a malformed registration ack (retrying): %s", exc)
            else:
                if ack.accepted:
                    self._lost_events = False  # a version-5 controller pulls what it needs
                    if ack.resync:
                        await self._resync(None)
                    self.registrations += 1
                    self._registered.set()
                    log.info(
                        "worker %s/%d registered with the controller",
                        self.identity.instance_id,
                        self.identity.worker_id,
                    )
                    return
                if ack.detail != refusal:  # once per reason, not once per retry
                    log.error("the controller refused this worker's registration: %s", ack.detail)
                    refusal = ack.detail
            with anyio.move_on_after(delay):
                await self._reregister.wait()  # a hello retries at once
            if self._reregister.is_set():  # that retry answers it; a set event must not spin
                self._reregister = anyio.Event()
            delay = min(delay * 2, _MAX_BACKOFF)

    # --- publishing events -------------------------------------------------------------------
    async def _publish_loop(self) -> None:
        interval = self.settings.worker_event_flush_interval
        assert self._publish_lock is not None
        while True:
            async with self._publish_lock:
                more = await self._publish_pending_locked()
            await anyio.sleep(0 if more else interval)

    def _take_pending(self, limit: int) -> list[KVEvent]:
        """Pop up to ``limit`` events, oldest first (popleft is safe beside the engine's append)."""
        pending = self._pending
        count = min(len(pending), limit)
        return list(starmap(pending.popleft, repeat((), count)))  # a C loop, no frame per event

    async def _publish_pending_locked(self) -> bool:
        """Publish what is pending (up to a bounded number of batches); True when more is left."""
        batch_size = self.settings.worker_event_batch_size
        events = self._take_pending(batch_size * _MAX_BATCHES_PER_ROUND)
        if not events:
            return False
        for location, (kinds, hashes, tokens) in pack_events(events).items():
            await self._publish_arrays(location, kinds, hashes, tokens, reset=False)
        return len(self._pending) > 0

    async def _publish_arrays(
        self,
        location: str,
        kinds: np.ndarray,
        hashes: np.ndarray,
        tokens: np.ndarray,
        *,
        reset: bool,
    ) -> None:
        """Publish one location's events as batches of at most ``worker_event_batch_size``."""
        bus = self._bus
        topic = events_topic(self.identity.instance_id, self.identity.worker_id)
        step = self.settings.worker_event_batch_size
        total = len(kinds)
        for start in range(0, max(total, 1), step):  # a reset with nothing to send still goes out
            seq = self._seq.get(location, 0) + 1
            self._seq[location] = seq  # numbered even when lost, so the receiver sees the gap
            batch_kinds = kinds[start : start + step]
            batch = EventBatch.build(
                self.identity,
                location,
                seq,
                batch_kinds,
                hashes[start : start + step],
                tokens[start : start + step],
                reset=reset and start == 0,
            )
            if (batch_kinds == EventKind.CLEAR).any():
                self._clear_seq[location] = seq
            payload = batch.encode()
            self._retained.add(location, seq, payload)  # a lost one can be replayed
            if bus is None:
                continue
            try:
                await bus.publish(topic, payload)
            except LMCacheError as exc:
                if not self._publish_failing:  # once per outage, not once per batch
                    log.warning(
                        "publishing events for %s failed (a replay will repair): %s", location, exc
                    )
                self._publish_failing = True
            else:
                self._publish_failing = False

    async def _resync(self, locations: Iterable[str] | None) -> dict[str, int]:
        """Send the inventory of ``locations`` (all when None) as reset batches; returns seqs."""
        assert self._publish_lock is not None
        wanted = list(self.engine.locations) if locations is None else list(locations)
        for name in wanted:
            if name not in self.engine.backends:
                raise UnknownLocationError(name, self.engine.locations)
        async with self._publish_lock:
            # events emitted before the snapshot go out first; those after it follow it, so
            # replaying both converges to what the engine holds
            while await self._publish_pending_locked():
                pass
            for name in wanted:
                items = (
                    await anyio.to_thread.run_sync(self.engine.inventory_at, name)
                    if name in self.engine.backends
                    else []  # closing
                )
                n = len(items)
                hashes = np.fromiter((key.chunk_hash for key, _ in items), dtype="<u8", count=n)
                tokens = np.fromiter((t for _, t in items), dtype="<u4", count=n)
                kinds = np.full(n, EventKind.ADMIT, dtype=np.uint8)
                await self._publish_arrays(name, kinds, hashes, tokens, reset=True)
            return {name: self._seq.get(name, 0) for name in wanted}

    async def _replay(self, command: ReplayCommand) -> CommandReply:
        """Publish the retained batches of the range again, then reply with the last one's seq."""
        assert self._publish_lock is not None
        location = command.location
        if location not in self.engine.backends:
            raise UnknownLocationError(location, self.engine.locations)
        async with self._publish_lock:
            last = min(command.last_seq, self._seq.get(location, 0))
            payloads = self._retained.range(location, command.first_seq, last)
            if payloads is None:
                return self._reply(
                    ok=False,
                    error_kind="not_retained",
                    error=f"batches {command.first_seq}..{last} of '{location}' are no longer "
                    f"retained (oldest kept: {self._retained.oldest(location)})",
                )
            bus = self._bus
            if bus is None:
                raise LMCacheError("not connected to the bus")
            topic = events_topic(self.identity.instance_id, self.identity.worker_id)
            for payload in payloads:
                await bus.publish(topic, payload)
        return self._reply(ok=True, location=location, last_seq={location: last})

    async def _inventory(self, command: InventoryCommand) -> CommandReply:
        """One page of a location's inventory (the first request takes the snapshot)."""
        assert self._publish_lock is not None
        name = command.location
        if name not in self.engine.backends:
            raise UnknownLocationError(name, self.engine.locations)
        snapshot_id = None
        if command.snapshot is None:
            async with self._publish_lock:
                # events emitted before the snapshot go out first, numbered up to its seq; those
                # after it are numbered after it, so the puller applies exactly those on top
                while await self._publish_pending_locked():
                    pass
                items = await anyio.to_thread.run_sync(self.engine.inventory_at, name)
                n = len(items)
                hashes = np.fromiter((key.chunk_hash for key, _ in items), dtype="<u8", count=n)
                tokens = np.fromiter((t for _, t in items), dtype="<u4", count=n)
                snapshot_id = self._snapshots.take(name, self._seq.get(name, 0), hashes, tokens)
        return self._reply(ok=True, location=name, inventory=self._snapshots.page(command, snapshot_id))

    async def _sync(self, timeout: float) -> bool:
        assert self._publish_lock is not None
        with anyio.move_on_after(timeout):
            async with self._publish_lock:
                while await self._publish_pending_locked():
                    pass
            bus = self._bus
            if bus is None or not bus.is_connected:
                return False
            await bus.flush(timeout)
            return True
        return False

    # --- heartbeats --------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.settings.worker_heartbeat_interval
        topic = heartbeat_topic(self.identity.instance_id, self.identity.worker_id)
        while True:
            try:
                usage = await anyio.to_thread.run_sync(self._location_usage, abandon_on_cancel=True)
                beat = Heartbeat(
                    instance_id=self.identity.instance_id,
                    worker_id=self.identity.worker_id,
                    epoch=self.identity.epoch,
                    last_seq=dict(self._seq),
                    **usage,
                )
                if self._bus is not None:
                    await self._bus.publish(topic, beat.encode())
            except LMCacheError as exc:
                log.debug("heartbeat not sent: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            await anyio.sleep(interval)

    def _location_usage(self) -> dict[str, dict[str, int]]:
        """A heartbeat's chunks, used bytes and capacity per location (from the backends' stats)."""
        usage: dict[str, dict[str, int]] = {"chunks": {}, "used_bytes": {}, "capacity_bytes": {}}
        for name, backend in list(self.engine.backends.items()):
            stats = backend.stats()
            chunks = stats.get("chunks")
            usage["chunks"][name] = int(chunks) if chunks is not None else len(backend.inventory())
            for key in ("used_bytes", "capacity_bytes"):
                if isinstance(stats.get(key), int):
                    usage[key][name] = stats[key]
        return usage

    # --- commands ----------------------------------------------------------------------------
    async def _on_command(self, msg: Message) -> None:
        # handled in the task group so a slow clear never holds up a lookup or a ping
        if self._tg is not None:
            self._tg.start_soon(self._answer, msg)

    def _reply(self, **fields: Any) -> CommandReply:
        return CommandReply(
            instance_id=self.identity.instance_id,
            worker_id=self.identity.worker_id,
            epoch=self.identity.epoch,
            **fields,
        )

    async def _answer(self, msg: Message) -> None:
        reply = await self._execute(msg.payload)
        try:
            await msg.respond(reply.encode())
        except Exception as exc:
            log.warning("could not answer a command on %s: %s", msg.topic, exc)

    async def _execute(self, payload: bytes) -> CommandReply:
        try:
            request = CommandRequest.decode(payload)
        except ValidationError as exc:
            return self._reply(
                ok=False, error_kind="bad_request", error=_explain_bad_request(payload, exc)
            )
        command = request.command
        late = time.time() - request.deadline if request.deadline is not None else 0.0
        if late > 0:
            # the sender gave up on it (a clear answered 504): carrying it out now would surprise
            log.warning(
                "dropped a %s command that arrived %.3f s after its deadline (event %s)",
                command.op, late, request.event_id,
            )
            return self._reply(
                ok=False,
                error_kind="expired",
                error=f"{command.op} arrived {late:.3f} s after its deadline; not carried out",
            )
        try:
            if isinstance(command, ClearCommand):
                return await self._clear(command.location)
            if isinstance(command, LookupCommand):
                return await self._lookup(command.tokens)
            if isinstance(command, ResyncCommand):
                return self._reply(ok=True, last_seq=await self._resync(command.locations))
            if isinstance(command, ReplayCommand):
                return await self._replay(command)
            if isinstance(command, RecodeCommand):
                return await self._recode(command)
            if isinstance(command, InventoryCommand):
                return await self._inventory(command)
            if isinstance(command, PushCommand):
                return await self._push(command)
            if isinstance(command, PingCommand):
                return self._reply(
                    ok=True, registration=self.registration(), last_seq=dict(self._seq)
                )
            if isinstance(command, ChunksCommand):
                return await self._chunks(command, request.deadline)
            return self._reply(
                ok=False, error_kind="bad_request", error=f"unsupported command {command!r}"
            )
        except SnapshotGone as exc:
            return self._reply(ok=False, error_kind="no_snapshot", error=str(exc))
        except UnknownLocationError as exc:
            return self._reply(
                ok=False,
                error_kind="unknown_location",
                error=str(exc),
                available_locations=list(self.engine.locations),
            )
        except UnknownCodecError as exc:
            return self._reply(
                ok=False, error_kind="unknown_codec", error=str(exc), available_codecs=exc.available
            )
        except CodecError as exc:
            return self._reply(ok=False, error_kind="unsupported", error=str(exc))
        except (LMCacheError, ValueError) as exc:
            return self._reply(ok=False, error_kind="internal", error=str(exc))
        except Exception as exc:  # a command must never crash the worker
            log.exception("command %s failed", command.op)
            return self._reply(
                ok=False, error_kind="internal", error=f"{type(exc).__name__}: {exc}"
            )

    async def _clear(self, location: str) -> CommandReply:
        assert self._publish_lock is not None
        if location not in self.engine.backends:
            raise UnknownLocationError(location, self.engine.locations)
        removed = await anyio.to_thread.run_sync(
            self.engine.clear, location, abandon_on_cancel=True
        )
        # the clear event is pending now: publish it (and all before it) before replying, so
        # the reply's last_seq names the batch that holds it (not a later one: admits that
        # follow the clear in later batches must still be applied)
        async with self._publish_lock:
            while await self._publish_pending_locked():
                pass
            last = self._clear_seq.get(location, self._seq.get(location, 0))
        return self._reply(
            ok=True, num_tokens=removed, location=location, last_seq={location: last}
        )

    async def _chunks(self, command: ChunksCommand, deadline: float | None) -> CommandReply:
        """Pin, unpin or move chunks at one location; a move's events are published before the
        reply, whose ``last_seq`` names the last batch of both locations. A move waits for a
        write-behind target until shortly before the deadline: chunks not written by then stay
        where they were (and are not counted)."""
        assert self._publish_lock is not None
        engine = self.engine
        touched = [command.location] + ([command.to_location] if command.to_location else [])
        for name in touched:
            if name not in engine.backends:
                raise UnknownLocationError(name, engine.locations)
        if command.op == "move":
            if command.to_location is None:
                raise ValueError("a move needs to_location")
            acted = await anyio.to_thread.run_sync(
                lambda: engine.move(
                    command.location, command.to_location, command.tokens,
                    should_copy=command.should_copy, timeout=_time_left(deadline),
                ),
                abandon_on_cancel=True,
            )
        else:
            action = engine.pin if command.op == "pin" else engine.unpin
            acted = await anyio.to_thread.run_sync(
                action, command.tokens, command.location, abandon_on_cancel=True
            )
        async with self._publish_lock:
            while await self._publish_pending_locked():
                pass
            last = {name: self._seq.get(name, 0) for name in touched}
        return self._reply(ok=True, num_tokens=acted, location=command.location, last_seq=last)

    async def _recode(self, command: RecodeCommand) -> CommandReply:
        """Re-encode one location's chunks in place; no event changes (keys and tokens stay)."""
        self.engine.backend(command.location)  # UnknownLocationError before any work
        recode = self.engine.compress if command.action == "compress" else self.engine.decompress
        done = await anyio.to_thread.run_sync(
            recode, command.location, command.method, command.tokens, abandon_on_cancel=True
        )
        return self._reply(ok=True, num_tokens=done, location=command.location)

    async def _push(self, command: PushCommand) -> CommandReply:
        peers = self.peers
        if peers is None:
            return self._reply(
                ok=False, error_kind="bad_request",
                error="this worker has no peer channel: start it with enable_p2p, p2p_host, p2p_init_ports",
            )
        result = await anyio.to_thread.run_sync(peers.push, command, abandon_on_cancel=True)
        if result.error is not None:
            return self._reply(ok=False, error_kind="peer", error=result.error, num_tokens=result.tokens)
        return self._reply(ok=True, num_tokens=result.tokens, location=command.location)

    async def _lookup(self, tokens: list[int]) -> CommandReply:
        found, location = await anyio.to_thread.run_sync(
            self._lookup_sync, tokens, abandon_on_cancel=True
        )
        return self._reply(ok=True, num_tokens=found, location=location)

    def _lookup_sync(self, tokens: list[int]) -> tuple[int, str | None]:
        """Longest stored prefix and the location holding most of it (ties: the fastest)."""
        engine = self.engine
        backends = list(engine.backends.items())
        held = {name: 0 for name, _ in backends}
        found = 0
        for span in engine.hasher.spans(tokens):
            key = engine.keys.key(span.chunk_hash)
            holders = [name for name, backend in backends if backend.contains(key)]
            if not holders:
                break
            for name in holders:
                held[name] += span.num_tokens
            found = span.end
        if found == 0:
            return 0, None
        best = max(held, key=held.__getitem__)  # max keeps the first (fastest) of equals
        return found, best


def _time_left(deadline: float | None, margin: float = 0.25) -> float | None:
    """Seconds until shortly before ``deadline`` (None: no deadline), so the reply still
    arrives in time."""
    return None if deadline is None else max(0.0, deadline - time.time() - margin)


def _explain_bad_request(payload: bytes, exc: ValidationError) -> str:
    """A short message for a command that does not parse, naming a protocol mismatch if any."""
    try:
        import json

        version = json.loads(payload).get("version")
    except Exception:
        version = None
    if isinstance(version, int) and version != PROTOCOL_VERSION:
        return (
            f"protocol version {version} is not supported; "
            f"this worker speaks version {PROTOCOL_VERSION}"
        )
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors()[:5]
    )
    return f"malformed command: {problems}"


def start_worker(engine: CacheEngine) -> WorkerHandle:
    """Start the worker of ``engine`` in a background thread; returns immediately.

    The worker connects, registers and publishes on its own, retrying while the controller or
    the bus is absent; ``handle.wait_registered(timeout)`` waits for the first registration.
    """
    return WorkerHandle(engine).start()
