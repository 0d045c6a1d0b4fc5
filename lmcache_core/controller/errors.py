"""Errors the controller raises, each mapped to one HTTP status by ``http_status``."""

from __future__ import annotations

from collections.abc import Iterable

from lmcache_core.errors import (
    LMCacheError,
    NoResponders,
    RequestTimeout,
    TransportError,
    UnknownLocationError,
)


class UnknownInstanceError(LMCacheError, KeyError):
    """An instance id no registered worker belongs to."""

    def __init__(self, instance_id: str, known: Iterable[str]) -> None:
        listed = ", ".join(sorted(known)) or "(none registered)"
        super().__init__(f"unknown instance '{instance_id}'; registered instances: {listed}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class UnknownWorkerError(LMCacheError, KeyError):
    """A worker rank that is not registered for an instance."""

    def __init__(self, instance_id: str, missing: Iterable[int], known: Iterable[int]) -> None:
        ranks = ", ".join(str(r) for r in sorted(missing))
        listed = ", ".join(str(r) for r in sorted(known)) or "(none)"
        super().__init__(
            f"instance '{instance_id}' has no worker {ranks}; registered workers: {listed}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class TooManyTokensError(LMCacheError):
    """A lookup's token list is longer than ``controller_max_lookup_tokens``."""


class WorkerUnavailableError(LMCacheError):
    """One or more workers did not answer a command in time (or nobody listened)."""


class BadWorkerReplyError(LMCacheError):
    """A worker answered with something the controller could not read."""


def http_status(exc: LMCacheError) -> int:
    """The HTTP status an error becomes at the API boundary."""
    if isinstance(exc, (UnknownInstanceError, UnknownWorkerError)):
        return 404
    if isinstance(exc, UnknownLocationError):
        return 400
    if isinstance(exc, TooManyTokensError):
        return 413
    if isinstance(exc, (WorkerUnavailableError, RequestTimeout, NoResponders)):
        return 504
    if isinstance(exc, (BadWorkerReplyError, TransportError)):
        return 502
    return 500
