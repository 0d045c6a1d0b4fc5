"""The ``codecs`` entry point: registers ``zstd`` and ``int8`` with lmcache-core."""

from __future__ import annotations

from lmcache_core.codecs import CodecSpec
from lmcache_core.hookspecs import hookimpl

from lmcache_codecs.int8 import INT8
from lmcache_codecs.zstd import ZSTD


@hookimpl
def lmcache_chunk_codecs() -> list[CodecSpec]:
    """``zstd`` and ``int8``."""
    return [ZSTD, INT8]
