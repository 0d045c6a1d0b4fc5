"""The event application: each worker location's ordered batches, the gaps between them, and
their repair.

``events.<inst>.<w>`` carries ordered ``EventBatch``es per location. A batch ahead of a missing
one is held (a bounded number per location) and applied in order once the missing one arrives.
Batches at or below what a clear covered are ignored. Heartbeats (another subscription) may
overtake the batches they announce: a ``last_seq`` beyond what was applied only says they
exist. A gap, known from a held batch or a heartbeat, may stand for ``controller_gap_grace``
seconds; then that worker is asked to ``replay`` the missing range from the batches it
retains, and to resync that location only when it no longer retains them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import anyio
import numpy as np
from pydantic import ValidationError

from lmcache_core.controller.base import ControllerBase
from lmcache_core.controller.records import LocationState, WorkerState
from lmcache_core.events import EventKind
from lmcache_core.errors import TransportError
from lmcache_core.transport import Message
from lmcache_core.wire import (
    PROTOCOL_VERSION,
    CommandReply,
    EventBatch,
    ReplayCommand,
    ResyncCommand,
    events_topic,
)

log = logging.getLogger(__name__)

#: batches held per location while an earlier one is missing (more: left to the replay)
MAX_HELD_BATCHES = 64
#: replays answered for one gap that still did not close it before a resync is asked for
REPLAYS_BEFORE_RESYNC = 2


class EventApplication(ControllerBase):
    """Batches in seq order per location, held batches, gaps, replays and resyncs."""

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
        self.feed.applied(batch.instance_id, batch.worker_id, batch.location, batch.reset, kinds, tokens)

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
            if loc.awaiting_reset and loc.pull is not None:
                await anyio.sleep(grace)  # its inventory is on the way (recovery.py)
                continue
            log.info(
                "%s at %s: batches %d..%d missing for %.1f s",
                worker.name, loc.name, loc.applied_seq + 1, loc.known_seq, time.monotonic() - since,
            )
            if loc.awaiting_reset:
                self._want_inventory(worker, loc)  # recovery.py: a pull that failed, again
            elif replayed >= REPLAYS_BEFORE_RESYNC:
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


    def _note_announced(self, worker: WorkerState, last_seq: Mapping[str, int]) -> None:
        """A heartbeat's ``last_seq``: batches that exist, perhaps only delayed (the gap's
        grace period decides)."""
        for name, loc in worker.locations.items():
            loc.known_seq = max(loc.known_seq, last_seq.get(name, 0))
            if loc.known_seq > loc.applied_seq:
                self._note_gap(worker, loc)

    async def _resync(self, worker: WorkerState, loc: LocationState) -> None:
        """Ask for one location's whole inventory (only its reset batch applies meanwhile)."""
        loc.awaiting_reset = True
        self.metrics.resyncs.inc()
        await self._tracked_command(worker, ResyncCommand(locations=[loc.name]), "resync")


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

