"""Errors the controller raises, each mapped to one HTTP status by ``http_status``, and
``error_answer``: what any exception becomes at the API boundary (a short JSON ``detail``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from fastapi.exceptions import RequestValidationError

from lmcache_core.codecs import CodecError, UnknownCodecError
from lmcache_core.errors import (
    LMCacheError,
    NoResponders,
    RequestTimeout,
    TransportError,
    UnknownLocationError,
)

log = logging.getLogger(__name__)

#: validation errors an answer lists at most (a body can hold a million bad items)
MAX_ERRORS = 5
#: longest message an error answer carries
MAX_TEXT = 200
#: longest field name an error answer repeats (an unknown one comes from the body)
MAX_FIELD = 64


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
        missing = sorted(missing)
        ranks = ", ".join(str(r) for r in missing[:MAX_ERRORS])
        if len(missing) > MAX_ERRORS:
            ranks += f" and {len(missing) - MAX_ERRORS} more"
        listed = ", ".join(str(r) for r in sorted(known)) or "(none)"
        super().__init__(
            f"instance '{instance_id}' has no worker {ranks}; registered workers: {listed}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownIpError(LMCacheError, KeyError):
    """An ip address no registered worker reported."""

    def __init__(self, ip: str, known: Iterable[str]) -> None:
        listed = ", ".join(sorted(set(known))[:MAX_ERRORS * 4]) or "(none registered)"
        super().__init__(f"no instance has ip '{_short(ip, MAX_FIELD)}'; registered ips: {listed}")

    def __str__(self) -> str:
        return str(self.args[0])


class BadOperationError(LMCacheError):
    """A request that is well formed but asks for something this controller cannot do (400)."""


class TooManyTokensError(LMCacheError):
    """A lookup's token list is longer than ``controller_max_lookup_tokens``."""


class RequestTooLargeError(LMCacheError):
    """A request body over the endpoint's limit (refused before it is read, when declared)."""


class RequestBodyTimeoutError(LMCacheError):
    """A request body that did not arrive within ``controller_request_timeout``."""


class WorkerUnavailableError(LMCacheError):
    """One or more workers did not answer a command in time (or nobody listened)."""


class BadWorkerReplyError(LMCacheError):
    """A worker answered with something the controller could not read."""


class NoPeerChannelError(LMCacheError):
    """A move between instances whose target serves no peer channel (``enable_p2p``)."""


def reply_error(reply: Any, worker: str, task: str, command: Any) -> LMCacheError:
    """The error a worker's failed ``reply`` to ``command`` stands for, by its ``error_kind``:
    the location or codec it does not know (400 listing what it knows), a codec that cannot do
    it (400), a peer it could not reach (503), anything else (502). ``task`` names what failed
    ("clear of 'LocalCPUBackend' on instance 'a'", "push to 10.0.0.2:8200")."""
    detail = f"worker {worker} failed the {task}: {reply.error}"
    kind = reply.error_kind
    if kind == "unknown_location":
        return UnknownLocationError(command.location, reply.available_locations or [])
    if kind == "unknown_codec":
        return UnknownCodecError(command.method, reply.available_codecs or [])
    if kind == "unsupported":
        return CodecError(detail)
    if kind == "peer":
        return WorkerUnavailableError(detail)
    return BadWorkerReplyError(detail)


def http_status(exc: LMCacheError) -> int:
    """The HTTP status an error becomes at the API boundary."""
    if isinstance(exc, (UnknownInstanceError, UnknownWorkerError, UnknownIpError)):
        return 404
    if isinstance(exc, (UnknownLocationError, BadOperationError, CodecError)):
        return 400
    if isinstance(exc, NoPeerChannelError):
        return 409
    if isinstance(exc, (TooManyTokensError, RequestTooLargeError)):
        return 413
    if isinstance(exc, RequestBodyTimeoutError):
        return 408
    if isinstance(exc, (WorkerUnavailableError, RequestTimeout, NoResponders)):
        return 504
    if isinstance(exc, (BadWorkerReplyError, TransportError)):
        return 502
    return 500


def _short(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as an answer lists them: type, field path and message of the first
    few, never the input (which may be huge, or hold NaN or bytes that JSON cannot carry)."""
    return [
        {
            "type": _short(str(error.get("type", "invalid"))),
            "loc": [p if type(p) is int else _short(str(p), MAX_FIELD) for p in islice(error.get("loc", ()), 16)],
            "msg": _short(str(error.get("msg", ""))),
        }
        for error in islice(errors, MAX_ERRORS)
    ]


def error_answer(exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body ``exc`` becomes at the API boundary; logs server faults.

    The one place error answers are shaped, for the FastAPI app and the raw ASGI paths alike.
    """
    if isinstance(exc, RequestValidationError):
        return 422, {"detail": short_errors(exc.errors())}
    if isinstance(exc, LMCacheError):
        status = http_status(exc)
        if status >= 500 and status not in (502, 504):
            log.error("request %s failed", path, exc_info=exc)
        return status, {"detail": str(exc)}
    log.error("request %s failed unexpectedly", path, exc_info=exc)
    return 500, {"detail": _short(f"internal error: {type(exc).__name__}: {exc}")}
