"""Read-only views of the registered fleet in LMCache's shapes: ``/query_instance``,
``GET /controller/workers`` and ``GET /controller/key-stats``.

A worker's ``key_count`` is what the index credits it with: its chunks summed over its
locations (a chunk on CPU and on disk counts at each), the same counts ``/instances`` shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcache_core.controller.errors import UnknownIpError, UnknownWorkerError
from lmcache_core.controller.models import InstanceKeyStats, KeyStatsResponse, WorkerSummary

if TYPE_CHECKING:
    from lmcache_core.controller.state import Controller, WorkerState


def key_count(controller: Controller, worker: WorkerState) -> int:
    """Chunks the index credits ``worker`` with, over all its locations."""
    return sum(controller.index.holder_stats(loc.holder)[0] for loc in worker.locations.values())


def lmcache_fields(worker: WorkerState) -> dict[str, Any]:
    """LMCache's fields of a worker (``LMCacheWorkerFields``)."""
    reg = worker.registration
    return {
        "instance_id": reg.instance_id,
        "worker_id": reg.worker_id,
        "ip": reg.ip,
        "port": reg.port,
        "peer_init_url": reg.peer_init_url,
        "registration_time": worker.registered_at,
        "last_heartbeat_time": worker.last_heartbeat_time,
    }


def worker_summary(controller: Controller, worker: WorkerState) -> WorkerSummary:
    return WorkerSummary(**lmcache_fields(worker), key_count=key_count(controller, worker))


def worker_summaries(
    controller: Controller, instance_id: str | None = None, worker_id: int | None = None
) -> list[WorkerSummary]:
    """Every worker (of ``instance_id``, of rank ``worker_id``), by instance id then rank.

    An unknown ``instance_id`` raises ``UnknownInstanceError``; a rank that instance does not
    have, ``UnknownWorkerError`` (both 404).
    """
    instances = sorted(controller.instances) if instance_id is None else [instance_id]
    workers = [w for inst in instances for w in controller._ranks(inst)]
    if worker_id is not None:
        matching = [w for w in workers if w.worker_id == worker_id]
        if not matching and instance_id is not None:
            raise UnknownWorkerError(instance_id, [worker_id], [w.worker_id for w in workers])
        workers = matching
    return [worker_summary(controller, w) for w in workers]


def key_stats(controller: Controller) -> KeyStatsResponse:
    """Chunk and worker counts per instance and in total."""
    instances = []
    for inst in sorted(controller.instances):
        workers = controller._ranks(inst)
        instances.append(
            InstanceKeyStats(
                instance_id=inst,
                key_count=sum(key_count(controller, w) for w in workers),
                worker_count=len(workers),
            )
        )
    return KeyStatsResponse(
        total_key_count=sum(i.key_count for i in instances),
        total_instance_count=len(instances),
        total_worker_count=sum(i.worker_count for i in instances),
        instances=instances,
    )


def instances_at(controller: Controller, ip: str) -> list[str]:
    """Ids of the instances with a worker that registered ``ip``, in id order;
    ``UnknownIpError`` (404) naming the registered ips when none has."""
    found = sorted({w.instance_id for w in controller.workers.values() if w.registration.ip == ip})
    if not found:
        raise UnknownIpError(ip, [w.registration.ip for w in controller.workers.values() if w.registration.ip])
    return found
