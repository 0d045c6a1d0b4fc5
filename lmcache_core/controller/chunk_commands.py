"""``/pin``, ``/unpin``, ``/move``, ``/compress`` and ``/decompress``: commands on the chunks at
one location of an instance.

``ChunkCommands`` is mixed into ``Controller`` (``state.py``): each operation validates the
instance and location names against what the workers registered, sends one ``ChunksCommand``
to every rank through ``Controller.command_instance`` (the path ``/clear`` takes), and answers
``{event_id, num_tokens}`` (summed over ranks). A move's events (admits at the new location,
evictions at the old) travel on the event stream; the answer waits until the controller has
applied the batches the workers named, so a ``/lookup`` after it sees the move.

A move between two instances travels over the peer channel (``controller/peers.py``,
``lmcache_core.p2p``): ``_move_between_instances``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anyio

from lmcache_core.controller.errors import BadOperationError
from lmcache_core.controller.peers import move_between_instances
from lmcache_core.errors import LMCacheError
from lmcache_core.controller.models import ChunksResponse, RecodeResponse
from lmcache_core.wire import ChunksCommand, CommandReply, RecodeCommand

if TYPE_CHECKING:
    from lmcache_core.controller.state import Controller

#: an ``[instance_id, location]`` pair, as LMCache's ``/move`` names a position
Position = tuple[str, str]


class ChunkCommands:
    """Pin, unpin, move and re-encode (compress, decompress), as methods of ``Controller``."""

    async def pin(self: Controller, instance_id: str, location: str, tokens: Sequence[int]) -> ChunksResponse:
        """Protect the chunks of ``tokens`` at ``location`` from eviction on every rank."""
        command = ChunksCommand(op="pin", location=location, tokens=list(tokens))
        return ChunksResponse(**await self.command_instance(instance_id, command, [location]))

    async def unpin(self: Controller, instance_id: str, location: str, tokens: Sequence[int]) -> ChunksResponse:
        """Make the chunks of ``tokens`` at ``location`` evictable again on every rank."""
        command = ChunksCommand(op="unpin", location=location, tokens=list(tokens))
        return ChunksResponse(**await self.command_instance(instance_id, command, [location]))

    async def recode(
        self: Controller,
        action: Literal["compress", "decompress"],
        instance_id: str,
        method: str,
        location: str,
        tokens: Sequence[int] | None = None,
    ) -> RecodeResponse:
        """Re-encode ``location`` on every rank of an instance (``/compress``, ``/decompress``).
        Keys and token counts stay, so the index is left as it is; a worker names the codecs it
        has when ``method`` is not one of them (400)."""
        command = RecodeCommand(
            action=action, method=method, location=location, tokens=list(tokens) if tokens is not None else None
        )
        return RecodeResponse(**await self.command_instance(instance_id, command, [location], kind=action))

    async def move(
        self: Controller, old: Position, new: Position, tokens: Sequence[int] | None = None,
        should_copy: bool = False,
    ) -> ChunksResponse:
        """Move (or copy) the chunks of ``tokens`` (None or empty: every chunk) from one location
        of an instance to another of the same instance, on every rank."""
        (instance_id, source), (target_instance, target) = old, new
        if instance_id != target_instance:
            return await self._move_between_instances(old, new, tokens, should_copy)
        if source == target:
            self._ranks(instance_id)  # an unknown instance is a 404 first
            raise BadOperationError(
                f"old_position and new_position are both '{source}' of instance '{instance_id}'; "
                "name two different locations"
            )
        command = ChunksCommand(
            op="move", location=source, to_location=target, tokens=list(tokens) if tokens else None,
            should_copy=should_copy,
        )

        async def until_applied(replies: dict[int, CommandReply]) -> None:
            await self._await_applied(instance_id, replies)

        return ChunksResponse(**await self.command_instance(instance_id, command, [source, target], until_applied))

    async def _move_between_instances(
        self: Controller, old: Position, new: Position, tokens: Sequence[int] | None, should_copy: bool
    ) -> ChunksResponse:
        """A move from one instance to another over the peer channel (``controller/peers.py``):
        each rank of the old instance pushes the stored prefix of ``tokens`` to the same rank of
        the new one, which stores it at the new location and announces it; without
        ``should_copy`` the old one then drops it. Both positions must be registered (404) and
        name their instances' locations (400); the new instance must serve a peer channel
        (409 otherwise)."""
        for instance_id, location in (old, new):
            self.check_locations(self.instance_locations(instance_id), [location])  # 404, then 400
        if not tokens:
            raise BadOperationError(
                f"a move between two instances ('{old[0]}' -> '{new[0]}') moves the chunks of a "
                "prompt: give its token ids in 'tokens'"
            )
        event_id = self.events.start("move")
        try:
            moved = await move_between_instances(self, list(tokens), old, new, should_copy, event_id)
        except LMCacheError as exc:
            self.events.finish(event_id, ok=False, detail=str(exc))
            raise
        self.events.finish(event_id)
        differ = len(set(moved.values())) > 1
        return ChunksResponse(event_id=event_id, num_tokens=sum(moved.values()), num_tokens_per_worker=moved if differ else None)

    async def _await_applied(self: Controller, instance_id: str, replies: dict[int, CommandReply]) -> None:
        """Wait, at most ``controller_command_timeout``, until the batches each reply's
        ``last_seq`` names are applied (a gap is left to the usual repair after that)."""

        def behind() -> bool:
            for rank, reply in replies.items():
                worker = self.workers.get((instance_id, rank))
                if worker is None or (reply.epoch and reply.epoch != worker.epoch):
                    continue  # gone or restarted: its registration resets what it held
                for name, seq in (reply.last_seq or {}).items():
                    loc = worker.locations.get(name)
                    if loc is not None and loc.applied_seq < seq:
                        return True
            return False

        with anyio.move_on_after(self.settings.controller_command_timeout):
            while behind():
                if self._events_progress is None:
                    self._events_progress = anyio.Event()
                await self._events_progress.wait()
