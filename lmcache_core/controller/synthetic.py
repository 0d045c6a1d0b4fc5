"""A synthetic worker: speaks the worker's side of ``lmcache_core.wire`` without an engine.

For benchmarks and tests that need many workers, precise sequence numbers (gaps on purpose)
or a worker that never answers. Real serving uses ``lmcache_core.worker``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import numpy as np

from lmcache_core.errors import TransportError
from lmcache_core.events import EventKind
from lmcache_core.inventory import InventorySnapshots, SnapshotGone
from lmcache_core.keys import HASH_SCHEME
from lmcache_core.transport import Message, MessageBus, Subscription
from lmcache_core.wire import (
    CommandReply,
    CommandRequest,
    EventBatch,
    HashingParams,
    Heartbeat,
    InventoryCommand,
    RegistrationAck,
    WorkerIdentity,
    WorkerRegistration,
    command_topic,
    events_topic,
    goodbye_topic,
    heartbeat_topic,
    register_topic,
)

#: how a synthetic worker answers commands: a reply, or None to never answer
CommandPolicy = Callable[[CommandRequest], "CommandReply | None"]


class SyntheticWorker:
    """One worker rank on ``bus``; the caller chooses every message it sends."""

    def __init__(
        self,
        bus: MessageBus,
        instance_id: str,
        worker_id: int = 0,
        *,
        locations: tuple[str, ...] = ("LocalCPUBackend",),
        chunk_size: int = 256,
        world_size: int = 1,
        model_name: str = "synthetic-model",
    ) -> None:
        self.bus = bus
        self.chunk_size = chunk_size
        self.ident = WorkerIdentity(instance_id=instance_id, worker_id=worker_id, epoch=uuid.uuid4().hex)
        self.registration = WorkerRegistration(
            **self.ident.model_dump(exclude={"version"}),
            world_size=world_size,
            model_name=model_name,
            kv_dtype="bfloat16",
            hashing=HashingParams(scheme=HASH_SCHEME, chunk_size=chunk_size),
            locations=list(locations),
            host="synthetic",
            started_at=time.time(),
        )
        self.seq: dict[str, int] = {name: 0 for name in locations}
        #: chunk hashes held per location: what an ``inventory`` command is answered with
        self.inventory: dict[str, np.ndarray] = {name: np.zeros(0, np.uint64) for name in locations}
        self._snapshots = InventorySnapshots()
        self.commands: list[CommandRequest] = []
        self._sub: Subscription | None = None

    async def register(self, timeout: float = 5.0) -> RegistrationAck:
        raw = await self.bus.request(
            register_topic(self.ident.instance_id, self.ident.worker_id), self.registration.encode(), timeout
        )
        return RegistrationAck.decode(raw)

    async def serve_commands(self, policy: CommandPolicy | None = None) -> None:
        """Answer commands on this worker's topic with ``policy`` (default: ok, nothing removed);
        ``inventory`` commands are answered from ``inventory`` (as of the last seq numbered)."""

        async def handle(msg: Message) -> None:
            request = CommandRequest.decode(msg.payload)
            self.commands.append(request)
            if isinstance(request.command, InventoryCommand):
                reply: CommandReply | None = self.inventory_reply(request.command)
            else:
                reply = policy(request) if policy is not None else self.reply(num_tokens=0)
            if reply is not None:
                await msg.respond(reply.encode())

        topic = command_topic(self.ident.instance_id, self.ident.worker_id)
        self._sub = await self.bus.subscribe(topic, handle)

    def inventory_reply(self, command: InventoryCommand) -> CommandReply:
        """One page of ``inventory`` (the first request snapshots it, as of ``seq``)."""
        name = command.location
        snapshot_id = None
        if command.snapshot is None:
            hashes = self.inventory.get(name, np.zeros(0, np.uint64))
            snapshot_id = self._snapshots.take(name, self.seq.get(name, 0), hashes, np.full(len(hashes), self.chunk_size, np.uint32))
        try:
            return self.reply(location=name, inventory=self._snapshots.page(command, snapshot_id))
        except SnapshotGone as exc:
            return self.reply(ok=False, error_kind="no_snapshot", error=str(exc))

    def reply(self, ok: bool = True, **fields: object) -> CommandReply:
        return CommandReply(
            ok=ok, instance_id=self.ident.instance_id, worker_id=self.ident.worker_id,
            epoch=self.ident.epoch, **fields,  # type: ignore[arg-type]
        )

    def batch(
        self,
        location: str,
        hashes: np.ndarray,
        tokens: np.ndarray | int = 256,
        kind: EventKind = EventKind.ADMIT,
        *,
        reset: bool = False,
        seq: int | None = None,
    ) -> EventBatch:
        """The next batch at ``location`` (``seq`` given: that number, for gaps on purpose)."""
        if seq is None:
            seq = self.seq[location] + 1
        self.seq[location] = max(self.seq[location], seq)
        n = len(hashes)
        toks = np.full(n, tokens, dtype=np.uint32) if isinstance(tokens, int) else tokens
        kinds = np.full(n, int(kind), dtype=np.uint8)
        return EventBatch.build(self.ident, location, seq, kinds, hashes, toks, reset=reset)

    async def publish(self, batch: EventBatch) -> None:
        await self.bus.publish(events_topic(self.ident.instance_id, self.ident.worker_id), batch.encode())

    async def heartbeat(self, last_seq: dict[str, int] | None = None) -> None:
        beat = Heartbeat(
            **self.ident.model_dump(exclude={"version"}),
            last_seq=dict(self.seq) if last_seq is None else last_seq,
            chunks={name: len(hashes) for name, hashes in self.inventory.items()},
        )
        await self.bus.publish(heartbeat_topic(self.ident.instance_id, self.ident.worker_id), beat.encode())

    async def goodbye(self) -> None:
        """Say this run stops (as a worker closing cleanly does)."""
        await self.bus.publish(goodbye_topic(self.ident.instance_id, self.ident.worker_id), self.ident.encode())

    async def aclose(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except TransportError:
                pass
