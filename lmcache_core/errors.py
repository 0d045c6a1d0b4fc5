"""The project's one exception hierarchy.

Every error a user can see is an ``LMCacheError``; third-party errors are caught at the
boundary and re-raised as one of these with context (``raise BackendError(...) from exc``).
"""

from __future__ import annotations

from collections.abc import Iterable


class LMCacheError(Exception):
    """Base class of every error raised by lmcache-core and its plugins."""


class ConfigError(LMCacheError):
    """A configuration key or value is wrong; the message names the key and what is expected."""


class PluginError(LMCacheError):
    """A plugin is broken or two plugins conflict (for example, both claim one location name)."""


class UnknownNameError(LMCacheError, KeyError):
    """A name (of a location, a codec ...) that nothing loaded provides; the message lists
    what is available."""

    #: what kind of name it is, in the message
    what = "name"
    #: what the message lists when nothing is available
    none = "(none)"

    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = sorted(available)
        listed = ", ".join(self.available) if self.available else self.none
        super().__init__(f"unknown {self.what} '{name}'; available: {listed}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class UnknownLocationError(UnknownNameError):
    """A location name that no loaded backend plugin provides."""

    what = "location"


class BackendError(LMCacheError):
    """A storage backend failed to store, read or remove data."""


class TransportError(LMCacheError):
    """The message bus between workers and the controller failed."""


class RequestTimeout(TransportError):
    """Nobody answered a request in time (a worker that is slow, gone or unreachable)."""


class NoResponders(TransportError):
    """A request went to a topic that no subscriber listens on."""


def find_lmcache_error(exc: BaseException) -> LMCacheError | None:
    """``exc`` itself or the first ``LMCacheError`` inside it (task groups raise exception groups)."""
    if isinstance(exc, LMCacheError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = find_lmcache_error(inner)
        if found is not None:
            return found
    return None
