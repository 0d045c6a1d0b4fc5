"""The registry: which workers (ranks of instances) are alive, in which run (epoch).

* ``register.<inst>.<w>`` (request): a worker's identity, hashing and locations; a new
  ``epoch`` (the worker restarted) empties what the index held for it. What the controller
  lacks of its inventory (a run it did not know, or one that lost events) it pulls itself,
  paced (``recovery.py``); the same run registering again keeps what was applied.
* ``heartbeat.<inst>.<w>``: liveness plus ``last_seq`` per location (gaps: ``apply.py``). A
  worker silent for ``controller_heartbeat_timeout`` seconds leaves the index
  (``remove_holder``). A heartbeat from a run the controller does not know gets a hello on that
  worker's own topic, naming its epoch: it alone registers again.
* ``goodbye.<inst>.<w>``: a worker stopping cleanly leaves the index at once.

A registration of a new epoch while another epoch of the same rank is alive (heard from within
``controller_heartbeat_timeout``) is a second instance with the same id: of the two, the one
that started later (``started_at``) is refused, logged on both sides, and the one that started
first keeps its entries. Every controller decides the same, whatever order it heard them in.
"""

from __future__ import annotations

import logging
import time

import anyio
from pydantic import ValidationError

from lmcache_core.controller.base import ControllerBase
from lmcache_core.controller.errors import UnknownInstanceError
from lmcache_core.controller.records import HashingGroup, HashingKey, HolderMeta, LocationState, WorkerState
from lmcache_core.errors import TransportError
from lmcache_core.keys import HASH_SCHEME, TokenHasher
from lmcache_core.transport import Message
from lmcache_core.wire import (
    HELLO_TOPIC,
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    RegistrationAck,
    WorkerIdentity,
    WorkerRegistration,
    goodbye_topic,
    heartbeat_topic,
    hello_topic,
    register_topic,
)

log = logging.getLogger(__name__)

#: scheme ids the controller can reproduce (see lmcache_core.keys)
SUPPORTED_SCHEMES = frozenset({HASH_SCHEME})
#: fewest seconds between two hellos the controller sends to one unknown worker
HELLO_MIN_INTERVAL = 1.0
#: unknown workers whose last hello time is remembered (beyond it, the oldest are forgotten)
_HELLO_MEMORY = 4096


def started_first(a: WorkerRegistration, b: WorkerRegistration) -> bool:
    """Whether run ``a`` started before run ``b`` of the same rank (ties: the lower epoch). A run
    that does not say when it started (``started_at`` 0) loses to none: ``a``, the one already
    registered, stays."""
    if not a.started_at or not b.started_at:
        return True
    return (a.started_at, a.epoch) <= (b.started_at, b.epoch)


def _duplicate_refusal(refused: WorkerRegistration, running: WorkerRegistration) -> str:
    return (
        f"instance id '{refused.instance_id}' rank {refused.worker_id} belongs to a running worker "
        f"(host {running.host or '?'}, pid {running.pid}); give each instance its own "
        "lmcache_instance_id (this one is retried, and accepted once that worker is gone)"
    )


class Registry(ControllerBase):
    """Registration, epochs and duplicates, heartbeats' liveness, goodbyes and expiry."""

    async def _say_hello(self) -> None:
        """Ask every worker to register again (a restarted controller recovers: it pulls the
        inventories it lacks, paced; the other controllers keep what they have)."""
        self._hello_at = time.monotonic()
        try:
            await self.bus.publish(HELLO_TOPIC, Hello().encode())
        except TransportError as exc:
            log.warning("cannot publish controller.hello: %s", exc)

    async def _ask_to_register(self, ident: WorkerIdentity, at_once: bool = False) -> None:
        """Ask one run of one worker, and nobody else, to register again: once it has been heard
        unregistered for a second (a run that just started, or that answers a hello, is
        registering while it heartbeats), at most once a second, and not within
        ``controller_heartbeat_timeout`` of a hello to every worker, whose registrations may
        still be on their way behind the heartbeats. ``at_once``: a run this controller has
        just displaced (a duplicate id) is asked now, so that it hears why."""
        run = (ident.instance_id, ident.worker_id, ident.epoch)
        now = time.monotonic()
        last = self._asked.get(run)
        if last is not None and now - last < HELLO_MIN_INTERVAL:
            return
        self._asked[run] = now
        self._asked.move_to_end(run)
        while len(self._asked) > _HELLO_MEMORY:
            self._asked.popitem(last=False)
        if not at_once:
            if last is None:
                return  # first heard: asked a second later if it has not registered by then
            if self._hello_at is not None and now - self._hello_at < max(
                HELLO_MIN_INTERVAL, self.settings.controller_heartbeat_timeout
            ):
                return
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
            if any(w.last_seen < time.monotonic() - timeout for w in self.workers.values()):
                if await self._caught_up_with_heartbeats(timeout, period):
                    self.expire_workers(time.monotonic() - timeout)

    async def _caught_up_with_heartbeats(self, timeout: float, period: float) -> bool:
        """Whether the heartbeats received so far were all handled (waiting up to ``timeout``).

        A controller that fell behind (a long index operation, a busy machine) or lost its bus
        cannot tell a silent worker from one whose heartbeats wait in its own queue: it drops
        nobody then, rather than dropping the fleet and pulling it all again.
        """
        sub = self._heartbeat_subscription
        if sub is None:
            return True
        with anyio.move_on_after(timeout):
            try:
                await self.bus.flush(timeout)  # what the server sent before this is now queued
            except TransportError:
                return False
            while sub.pending():
                await anyio.sleep(period / 10)  # the handler drains the queue meanwhile
            return True
        return False

    def expire_workers(self, deadline: float) -> list[str]:
        """Remove every worker last seen before ``deadline`` (monotonic); returns their names."""
        dead = [w for w in self.workers.values() if w.last_seen < deadline]
        for worker in dead:
            started = time.perf_counter()
            self._forget_worker(worker)
            self.metrics.worker_removal_seconds.observe(time.perf_counter() - started)
            self.metrics.workers_expired.inc()
            log.warning("worker %s missed its heartbeats; removed from the index", worker.name)
            self.feed.worker_event("lost", worker.instance_id, worker.worker_id, "missed its heartbeats; removed")
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

    def register(self, reg: WorkerRegistration) -> RegistrationAck:
        """Record a worker (a new epoch empties what it held) and queue a pull of what this
        controller lacks of its inventory (``recovery.py``); the ack asks the worker for nothing."""
        key = (reg.instance_id, reg.worker_id)
        old = self.workers.get(key)
        now = time.monotonic()
        refusal = None
        displaced: WorkerRegistration | None = None
        if reg.version != PROTOCOL_VERSION:
            refusal = f"protocol version {reg.version} is not supported; this controller speaks {PROTOCOL_VERSION}"
        elif reg.hashing.scheme not in SUPPORTED_SCHEMES:
            refusal = f"hash scheme '{reg.hashing.scheme}' is not supported; known: {', '.join(sorted(SUPPORTED_SCHEMES))}"
        elif (
            old is not None
            and old.epoch != reg.epoch
            and now - old.last_seen < self.settings.controller_heartbeat_timeout
        ):
            # two live runs on one rank: every controller keeps the one that started first, so
            # controllers that heard them in another order still agree
            if started_first(old.registration, reg):
                refusal = _duplicate_refusal(reg, old.registration)
            else:
                displaced = old.registration
        if refusal is not None:
            if self._refused.get(key) != reg.epoch:  # once per run, not once per retry
                log.error(
                    "refused worker %s/%d (epoch %s, host %s, pid %d): %s",
                    reg.instance_id, reg.worker_id, reg.epoch, reg.host or "?", reg.pid, refusal,
                )
                self.feed.worker_event("refused", reg.instance_id, reg.worker_id, f"refused: {refusal}")
            self._refused[key] = reg.epoch  # its heartbeats must not make it register again
            return RegistrationAck(accepted=False, resync=False, detail=refusal)
        self._refused.pop(key, None)
        if displaced is not None:
            # the run it knew started after this one: refused now, and asked to register again so
            # that it hears why (its heartbeats are ignored from now on)
            log.error(
                "refused worker %s/%d (epoch %s, host %s, pid %d): %s",
                displaced.instance_id, displaced.worker_id, displaced.epoch, displaced.host or "?",
                displaced.pid, _duplicate_refusal(displaced, reg),
            )
            self._forget_worker(old)  # type: ignore[arg-type]
            old = None
            self._refused[key] = displaced.epoch
            if self._tg is not None:
                self._tg.start_soon(self._ask_to_register, displaced, True)
        hashing: HashingKey = (reg.hashing.scheme, reg.hashing.chunk_size, reg.hashing.namespace)
        if old is not None and old.epoch == reg.epoch and old.hashing == hashing:
            # the same run registering again (hello, reconnect): keep what is applied (batches
            # lost meanwhile show as gaps), unless it says it dropped events it cannot replay
            kept = {name: old.locations[name] for name in reg.locations if name in old.locations}
            for name, loc in old.locations.items():
                if name not in kept:
                    self.index.remove_holder(loc.holder)
                    self._holders.pop(loc.holder, None)
                    self._layout.drop_holder(loc.holder)
            if reg.lost_events:
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
            group = self._groups[hashing] = HashingGroup(TokenHasher(reg.hashing.chunk_size, reg.hashing.namespace))
        group.workers.add(key)
        self.metrics.registrations.inc()
        log.info("worker %s registered (epoch %s, locations %s)", worker.name, reg.epoch, list(locations))
        self.feed.worker_event("registered", reg.instance_id, reg.worker_id, f"registered ({', '.join(locations)})")
        for loc in locations.values():
            if loc.awaiting_reset:
                self._want_inventory(worker, loc)  # recovery.py: paced, answered to us alone
        return RegistrationAck(accepted=True, resync=False)

    async def _on_goodbye(self, msg: Message) -> None:
        ident = self._decode_claim(msg, WorkerIdentity, goodbye_topic, "goodbye")
        if ident is not None:
            self.goodbye(ident)

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
        self.feed.worker_event("left", worker.instance_id, worker.worker_id, "stopped; removed")
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
        worker.last_beat = beat
        self._note_announced(worker, beat.last_seq)  # apply.py: the gaps it reveals


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

