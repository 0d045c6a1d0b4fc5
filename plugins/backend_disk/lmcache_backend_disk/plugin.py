"""The ``backend_disk`` entry point: registers the LocalDiskBackend location."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmcache_core.errors import BackendError
from lmcache_core.events import EventSink
from lmcache_core.hookspecs import hookimpl
from lmcache_core.storage import BackendSpec

from lmcache_backend_disk.backend import LOCATION, LocalDiskBackend
from lmcache_backend_disk.settings import DiskSettings

if TYPE_CHECKING:
    from lmcache_core.config import LMCacheSettings


def create_backend(settings: "LMCacheSettings", event_sink: EventSink) -> LocalDiskBackend:
    """Build the backend from ``local_disk``, ``max_local_disk_size``, the ``disk_*`` keys and
    ``lmcache_instance_id`` (which names the backend's write area in ``local_disk``)."""
    directory = settings.local_disk_path
    if directory is None:
        raise BackendError("LocalDiskBackend needs the 'local_disk' setting (a directory)")
    disk = DiskSettings.from_settings(settings)
    capacity = settings.max_local_disk_bytes
    return LocalDiskBackend(
        directory,
        event_sink,
        capacity_bytes=capacity if capacity > 0 else None,
        write_queue_size=disk.disk_write_queue_size,
        queue_full_policy=disk.disk_queue_full_policy,
        fsync=disk.disk_fsync,
        auto_capacity_fraction=disk.disk_auto_capacity_fraction,
        instance_id=settings.lmcache_instance_id,
    )


@hookimpl
def lmcache_storage_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            LOCATION,
            factory=create_backend,
            tier=10,
            enabled=lambda settings: settings.local_disk is not None,
            settings_model=DiskSettings,
            description="One checksummed file per chunk in this instance's write area of "
            "local_disk, written behind by a background thread (atomic rename, fsync), LRU within "
            "max_local_disk_size; other instances' areas of the same directory are read on a miss.",
        )
    ]
