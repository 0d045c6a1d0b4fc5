"""The controller's part in peer-to-peer transfer: who holds a prefix, and moves between instances.

The controller never touches chunk bytes: it answers a worker's ``peer_lookup`` (which other
instance's worker of the same rank, model shard and hashing holds the longest prefix of these
chunk hashes, at any of its locations, and where its peer channel is), and for a move between
instances it commands the source's workers to ``push`` to the target's peer channels, rank to
rank. What arrives is credited through the target's own admit events.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from lmcache_core.controller.errors import NoPeerChannelError, reply_error
from lmcache_core.controller.index import longest_prefix
from lmcache_core.errors import UnknownLocationError
from lmcache_core.wire import PeerLookupReply, PeerLookupRequest, PushCommand

if TYPE_CHECKING:
    from lmcache_core.controller.records import WorkerState
    from lmcache_core.controller.state import Controller

log = logging.getLogger(__name__)


def _same_shard(a: "WorkerState", b: "WorkerState") -> bool:
    ra, rb = a.registration, b.registration
    return (
        ra.worker_id == rb.worker_id
        and ra.world_size == rb.world_size
        and ra.model_name == rb.model_name
        and ra.kv_dtype == rb.kv_dtype
        and a.hashing == b.hashing
    )


def find_peer(controller: "Controller", request: PeerLookupRequest) -> PeerLookupReply:
    """The peer worker holding the longest prefix of ``request``'s hashes (ties: the first
    registered), among other instances' workers that serve a peer channel."""
    asking = controller.workers.get((request.instance_id, request.worker_id))
    if asking is None or asking.epoch != request.epoch:
        return PeerLookupReply(found=False, detail="the asking worker is not registered")
    hashes = request.hash_array().astype(np.uint64)
    if len(hashes) == 0:
        return PeerLookupReply(found=False)
    holders, masks = controller.index.lookup_grid(hashes)
    held: dict[tuple[str, int], np.ndarray] = {}
    for holder, mask in zip(holders.tolist(), masks):
        meta = controller._holders.get(holder)
        if meta is None:
            continue
        worker = meta.worker
        if worker.instance_id == request.instance_id or not worker.registration.peer_init_url:
            continue
        if not _same_shard(worker, asking):
            continue
        key = (worker.instance_id, worker.worker_id)
        held[key] = mask if key not in held else (held[key] | mask)  # any of its locations
    best: tuple[int, tuple[str, int]] | None = None
    for key, mask in held.items():
        chunks = longest_prefix(mask)
        if chunks and (best is None or chunks > best[0]):
            best = (chunks, key)
    if best is None:
        return PeerLookupReply(found=False)
    chunks, key = best
    worker = controller.workers[key]
    chunk_size = worker.hashing[1]
    return PeerLookupReply(
        found=True,
        instance_id=worker.instance_id,
        worker_id=worker.worker_id,
        peer_init_url=worker.registration.peer_init_url,
        chunks=chunks,
        num_tokens=min(chunks * chunk_size, request.num_tokens),
    )


async def move_between_instances(
    controller: "Controller",
    tokens: list[int],
    source: tuple[str, str],
    target: tuple[str, str | None],
    copy: bool,
    event_id: str,
) -> dict[int, int]:
    """Have each rank of ``source`` (instance, location) push the stored prefix of ``tokens``
    to the same rank of ``target`` (instance, location or None: every tier), over the peer
    channel; unless ``copy`` the source then drops them. Returns tokens moved per rank. The
    commands run under ``event_id`` (``/check_finish``), which the caller finishes.

    ``NoPeerChannelError`` when a target rank serves no peer channel; the target's admits
    credit it in the index as they arrive.
    """
    source_instance, source_location = source
    target_instance, target_location = target
    sources = controller._ranks(source_instance)
    targets = {w.worker_id: w for w in controller._ranks(target_instance)}
    available = controller.instance_locations(source_instance)
    if source_location not in available:
        raise UnknownLocationError(source_location, available)
    if target_location is not None:
        target_available = controller.instance_locations(target_instance)
        if target_location not in target_available:
            raise UnknownLocationError(target_location, target_available)
    # every target rank is checked before any rank pushes: a move is refused whole, not half done
    commands: list[tuple[WorkerState, PushCommand]] = []
    for worker in sources:
        peer = targets.get(worker.worker_id)
        url = peer.registration.peer_init_url if peer is not None else None
        if peer is None or not url:
            raise NoPeerChannelError(
                f"instance '{target_instance}' rank {worker.worker_id} serves no peer channel: "
                "start it with enable_p2p, p2p_host and p2p_init_ports"
            )
        commands.append((worker, PushCommand(
            tokens=tokens, peer_init_url=url, location=source_location,
            target_location=target_location, should_copy=copy,
        )))
    replies, errors = await controller._fan_out_each(commands, event_id)
    moved: dict[int, int] = {}
    for worker, command in commands:
        rank, url = worker.worker_id, command.peer_init_url
        if rank in errors:
            raise errors[rank]
        reply = replies[rank]
        if not reply.ok:
            raise reply_error(reply, worker.name, f"push to {url}", command)
        moved[rank] = int(reply.num_tokens or 0)
        log.info(
            "moved %d tokens from %s (%s) to %s/%d (%s)%s",
            moved[rank], worker.name, source_location, target_instance, rank,
            target_location or "every tier", " as a copy" if copy else "",
        )
    return moved
