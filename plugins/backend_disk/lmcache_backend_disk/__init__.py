"""LocalDiskBackend for lmcache-core: checksummed chunk files, written behind, crash-safe."""

from lmcache_backend_disk.areas import area_name
from lmcache_backend_disk.backend import LOCATION, LocalDiskBackend
from lmcache_backend_disk.chunkfile import ChunkHeader, CorruptChunkError, file_name
from lmcache_backend_disk.settings import DiskSettings

__all__ = [
    "LOCATION",
    "ChunkHeader",
    "CorruptChunkError",
    "DiskSettings",
    "LocalDiskBackend",
    "area_name",
    "file_name",
]
