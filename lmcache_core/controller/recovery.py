"""Recovery: pulling the inventories the controller lacks, a bounded window at a time.

A controller that starts (or meets a run it does not know, or a run that lost events) has no
base for that worker's batches. It does not ask the worker to publish its inventory: a fleet
answering one hello at once would swamp the controller's connection (nats-server cuts a slow
consumer), and every other controller on the bus would apply it again. Instead it queues the
location and ``controller_recovery_window`` pullers take it in turn: each asks the worker for
its inventory one page at a time (``inventory`` commands, request/reply), so only this
controller receives it and at most one page per puller is ever in flight. The first page
names the snapshot's ``seq``: batches up to it are in the snapshot, the ones after it are
held meanwhile (``apply.py``) and applied on top once it is installed.

A pull that fails (the worker does not answer, or answers nonsense) leaves the location waiting
and is queued again after ``controller_gap_grace``, as long as the worker is registered.
"""

from __future__ import annotations

import logging

import anyio
import numpy as np
from anyio.abc import TaskGroup

from lmcache_core.controller.base import ControllerBase
from lmcache_core.controller.errors import BadWorkerReplyError
from lmcache_core.controller.records import LocationState, WorkerState
from lmcache_core.errors import LMCacheError
from lmcache_core.events import EventKind
from lmcache_core.wire import CommandReply, InventoryCommand, InventoryPage

log = logging.getLogger(__name__)

#: bounds on the room reserved ahead of queued inventories: 4M chunks at one location (256 GB
#: of 64 KiB chunks) and 128M entries in all (about 4 GB of index)
_MAX_HINT_PER_LOCATION = 1 << 22
_MAX_HINT = 1 << 27


class Recovery(ControllerBase):
    """A queue of locations to pull, and the window of pullers that drains it."""

    #: pulls running now, and the most that ever ran at once (at most the window)
    pulls_running = 0
    most_pulls_running = 0

    def _start_pullers(self, tg: TaskGroup) -> None:
        for _ in range(self.settings.controller_recovery_window):
            tg.start_soon(self._puller)

    def _want_inventory(self, worker: WorkerState, loc: LocationState) -> None:
        """Queue a pull of ``loc``'s inventory, unless one is queued or running."""
        if loc.pull is not None:
            return
        loc.pull = "queued"
        self._to_pull.append((worker, loc))
        if self._pull_wanted is not None:
            self._pull_wanted.set()
            self._pull_wanted = None

    def _current(self, worker: WorkerState, loc: LocationState) -> WorkerState | None:
        """The registered worker ``loc`` still belongs to (a registration of the same run keeps
        its locations); None when it left or started afresh."""
        now = self.workers.get((worker.instance_id, worker.worker_id))
        if now is None or now.locations.get(loc.name) is not loc:
            return None
        return now

    async def _puller(self) -> None:
        while True:
            while not self._to_pull:
                if self._pull_wanted is None:
                    self._pull_wanted = anyio.Event()
                await self._pull_wanted.wait()
            worker, loc = self._to_pull.popleft()
            current = self._current(worker, loc)
            if current is None or not loc.awaiting_reset:
                loc.pull = None
                continue  # it left, or a reset batch came meanwhile
            loc.pull = "pulling"
            self.pulls_running += 1
            self.most_pulls_running = max(self.most_pulls_running, self.pulls_running)
            try:
                await self._pull(current, loc)
            finally:
                loc.pull = None
                self.pulls_running -= 1

    async def _pull(self, worker: WorkerState, loc: LocationState) -> None:
        """Read one location's inventory, page by page, and install it."""
        event_id = self.events.start("inventory")
        limit = self.settings.controller_inventory_page
        pages: list[InventoryPage] = []
        snapshot: str | None = None
        offset = 0
        try:
            while True:
                command = InventoryCommand(location=loc.name, snapshot=snapshot, offset=offset, limit=limit)
                page = self._page_of(worker, loc, await self._command(worker, command, event_id), offset, snapshot)
                self.metrics.inventory_pages.inc()
                pages.append(page)
                snapshot = page.snapshot
                offset += len(page.hashes) // 8
                if offset >= page.total:
                    break
                if self._current(worker, loc) is None or not loc.awaiting_reset:
                    self.events.finish(event_id, ok=False, detail="not needed any more")
                    self.metrics.inventories_pulled.labels("abandoned").inc()
                    return
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            self.metrics.inventories_pulled.labels("failed").inc()
            log.warning("pulling the inventory of %s at %s failed (pulled again after %g s): %s",
                        worker.name, loc.name, self.settings.controller_gap_grace, exc)
            if self._tg is not None:
                self._tg.start_soon(self._pull_again, worker, loc)
            return
        self.events.finish(event_id)
        self._install(worker, loc, pages)

    def _queued_chunks(self) -> int:
        """The chunks the queued pulls will bring, as their workers' last heartbeats count them
        (a hint only: each count and the sum are bounded, so a wrong one cannot balloon the index)."""
        total = sum(
            min(max(worker.last_beat.chunks.get(loc.name, 0), 0), _MAX_HINT_PER_LOCATION)
            for worker, loc in self._to_pull
            if worker.last_beat is not None
        )
        return min(total, _MAX_HINT)

    async def _pull_again(self, worker: WorkerState, loc: LocationState) -> None:
        """After a failed pull: queue it again once the gap's grace has passed, if still needed
        (a worker that left is dropped by its heartbeats; a reset batch may have come)."""
        await anyio.sleep(self.settings.controller_gap_grace)
        current = self._current(worker, loc)
        if current is not None and loc.awaiting_reset:
            self._want_inventory(current, loc)

    def _page_of(
        self, worker: WorkerState, loc: LocationState, reply: CommandReply, offset: int, snapshot: str | None
    ) -> InventoryPage:
        """The page a reply carries, checked against what was asked."""
        page = reply.inventory
        if not reply.ok or page is None:
            raise BadWorkerReplyError(
                f"worker {worker.name} sent no inventory page of '{loc.name}': "
                f"{reply.error or 'the reply holds none'} ({reply.error_kind or 'ok'})"
            )
        if page.location != loc.name or page.offset != offset or (snapshot is not None and page.snapshot != snapshot):
            raise BadWorkerReplyError(
                f"worker {worker.name} answered page {page.offset} of snapshot {page.snapshot} at "
                f"'{page.location}' for page {offset} of snapshot {snapshot} at '{loc.name}'"
            )
        try:
            hashes, _ = page.arrays()
        except ValueError as exc:
            raise BadWorkerReplyError(f"worker {worker.name} sent an unreadable inventory page: {exc}") from exc
        if not len(hashes) and offset < page.total:
            raise BadWorkerReplyError(f"worker {worker.name} sent an empty page {offset} of {page.total}")
        return page

    def _install(self, worker: WorkerState, loc: LocationState, pages: list[InventoryPage]) -> None:
        """Replace the location's entries with the snapshot; the held batches after it follow."""
        seq = pages[0].seq
        if self._current(worker, loc) is None or not loc.awaiting_reset or seq < loc.applied_seq:
            self.metrics.inventories_pulled.labels("superseded").inc()
            return  # it left, restarted, or a reset batch of its own came meanwhile
        arrays = [page.arrays() for page in pages]
        hashes = np.concatenate([h for h, _ in arrays]) if arrays else np.zeros(0, np.uint64)
        tokens = np.concatenate([t for _, t in arrays]) if arrays else np.zeros(0, np.uint32)
        self.index.clear_holder(loc.holder)
        if not self.index.fits(len(hashes)):
            # grow once for this and every inventory still queued (a restarted controller's
            # whole fleet), not once per few installs
            self.index.reserve(len(hashes) + self._queued_chunks())
        if len(hashes):
            self.index.admit(loc.holder, hashes, tokens)
        loc.awaiting_reset = False
        loc.applied_seq = seq
        loc.known_seq = max(loc.known_seq, seq)
        self.metrics.inventories_pulled.labels("installed").inc()
        admits = np.full(len(hashes), EventKind.ADMIT, dtype=np.uint8)
        self.feed.applied(worker.instance_id, worker.worker_id, loc.name, True, admits, tokens)  # the page's feed
        self._drain(worker, loc)  # apply.py: the held batches after it, in order
