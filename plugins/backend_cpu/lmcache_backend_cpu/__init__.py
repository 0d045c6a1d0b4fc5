"""LocalCPUBackend: an lmcache-core storage location in one preallocated CPU memory pool."""

from lmcache_backend_cpu.allocator import ALIGNMENT, PoolAllocator
from lmcache_backend_cpu.backend import LOCATION, LocalCPUBackend

__all__ = ["ALIGNMENT", "LOCATION", "LocalCPUBackend", "PoolAllocator"]
