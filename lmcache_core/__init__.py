"""lmcache-core: a pluggable KV-cache layer for LLM serving."""

from lmcache_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
