"""Chunk codecs for lmcache-core: ``zstd`` (lossless) and ``int8`` (lossy, per channel)."""

from lmcache_codecs.int8 import INT8, int8_error_bound
from lmcache_codecs.zstd import ZSTD

__all__ = ["INT8", "ZSTD", "int8_error_bound"]
