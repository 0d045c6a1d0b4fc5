"""The ``backend_cpu`` entry point: registers ``LocalCPUBackend`` with lmcache-core."""

from __future__ import annotations

from lmcache_core.hookspecs import hookimpl
from lmcache_core.storage import BackendSpec

from lmcache_backend_cpu.backend import LOCATION, LocalCPUBackend


@hookimpl
def lmcache_storage_backends() -> list[BackendSpec]:
    """``LocalCPUBackend``, the fastest tier, on when ``local_cpu`` is true."""
    return [
        BackendSpec(
            LOCATION,
            factory=LocalCPUBackend.from_settings,
            tier=0,
            enabled=lambda settings: settings.local_cpu,
            description=(
                "Chunks in one preallocated CPU memory pool (page-locked when CUDA is present) "
                "of max_local_cpu_size GB, evicted least recently used first."
            ),
        )
    ]
