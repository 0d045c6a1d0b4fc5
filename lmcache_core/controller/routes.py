"""The controller's built-in HTTP endpoints, contributed through ``lmcache_controller_routes``.

Handlers stay thin: they validate the body (pydantic; ``parse_lookup`` for ``/lookup``), call
the ``Controller`` and shape the answer; errors are ``LMCacheError``s that the app turns into
JSON ``{"detail": ...}`` (``errors.error_answer``).
"""

from __future__ import annotations

import struct
from itertools import islice
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
import numpy as np
import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Scope, Send

from lmcache_core.controller.asgi import send_json
from lmcache_core.controller import fleet
from lmcache_core.controller.deps import get_controller
from lmcache_core.controller.errors import MAX_ERRORS, error_answer
from lmcache_core.controller.models import (
    CheckFinishRequest,
    CheckFinishResponse,
    ChunksResponse,
    ClearRequest,
    ClearResponse,
    HealthRequest,
    HealthResponse,
    InstancesResponse,
    KeyStatsResponse,
    MoveRequest,
    QueryInstanceRequest,
    QueryInstanceResponse,
    TokensAtLocationRequest,
    WorkerSummary,
    WorkersResponse,
    MAX_INSTANCE_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_TOKEN_ID,
    LookupRequest,
    LookupResponse,
    QueryWorkerInfoRequest,
    QueryWorkerInfoResponse,
    RecodeRequest,
    RecodeResponse,
)
from lmcache_core.controller.state import Controller
from lmcache_core.hookspecs import hookimpl
from lmcache_core.keys import TokenHasher


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI requestBody for a route that parses its body itself."""
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


class LookupQuery(NamedTuple):
    """A parsed ``/lookup`` body."""

    tokens: np.ndarray  # int64: chunk hashes are computed over 64-bit token ids
    model: str | None
    instance_id: str | None


_LOOKUP_FIELDS = frozenset(LookupRequest.model_fields)
_NAME_LIMITS = (("model", MAX_NAME_LENGTH), ("instance_id", MAX_INSTANCE_ID_LENGTH))
#: bodies larger than this are parsed and hashed in a worker thread, so the event loop keeps
#: serving heartbeats meanwhile (an 8,192-token body is about 50 KB)
OFF_LOOP_BYTES = 256 * 1024
#: largest body of the other endpoints that take token ids (/pin, /unpin, /move): about
#: 40,000 ids, which pydantic validates on the event loop (a few tens of milliseconds at most)
TOKENS_BODY_BYTES = OFF_LOOP_BYTES
#: big bodies parsed at once (each may take several times its size in memory while parsed)
OFF_LOOP_THREADS = 2


def parse_lookup(raw: bytes) -> LookupQuery:
    """A ``/lookup`` body read at C speed: orjson, then one ``struct.pack`` range-checking every
    token id (pydantic validating 8k ids would cost about half a lookup);
    ``RequestValidationError`` naming the first problems of anything else.

    Token ids are JSON integers in [0, 2^32): ``struct`` refuses floats, strings, nulls,
    negative and larger ids; booleans (which it takes for 0 and 1) are looked for only when
    the body spells one. NaN, Infinity and bytes that are not UTF-8 are not JSON.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError([_error("json_invalid", (), f"Invalid JSON: {exc}")]) from None
    if type(body) is not dict:
        raise RequestValidationError([_error("model_type", (), "Input should be an object")])
    tokens = body.get("tokens")
    if type(tokens) is list and body.keys() <= _LOOKUP_FIELDS and not _name_errors(body):
        packed = _pack_tokens(tokens, raw)
        if packed is not None:
            ids = np.frombuffer(packed, dtype="<u4").astype("<i8")
            return LookupQuery(ids, body.get("model"), body.get("instance_id"))
    raise RequestValidationError(_lookup_errors(body))


def _pack_tokens(tokens: list[Any], raw: bytes) -> bytes | None:
    """``tokens`` as little-endian uint32, or None when one is not a token id."""
    try:
        # one C call for the whole list; 3x cheaper than filling an array here
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error:
        return None
    if (b"true" in raw or b"false" in raw) and _first_bad_token(tokens) is not None:
        return None
    return packed


def _error(kind: str, loc: tuple[str | int, ...], msg: str) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


def _first_bad_token(tokens: list[Any]) -> int | None:
    return next((i for i, t in enumerate(tokens) if type(t) is not int or not 0 <= t < MAX_TOKEN_ID), None)


def _name_errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    errors = []
    for name, limit in _NAME_LIMITS:
        value = body.get(name)
        if value is not None and type(value) is not str:
            errors.append(_error("string_type", (name,), "Input should be a valid string"))
        elif value is not None and len(value) > limit:
            errors.append(_error("string_too_long", (name,), f"String should have at most {limit} characters"))
    return errors


def _lookup_errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    """What is wrong with a ``/lookup`` body: unknown fields, the first bad token id, the names."""
    extra = islice((key for key in body if key not in _LOOKUP_FIELDS), MAX_ERRORS)
    errors = [_error("extra_forbidden", (key,), "Extra inputs are not permitted") for key in extra]
    tokens = body.get("tokens")
    if "tokens" not in body:
        errors.append(_error("missing", ("tokens",), "Field required"))
    elif type(tokens) is not list:
        errors.append(_error("list_type", ("tokens",), "Input should be a valid array"))
    else:
        bad = _first_bad_token(tokens)
        if bad is not None:
            msg = f"Token ids should be JSON integers in [0, {MAX_TOKEN_ID})"
            errors.append(_error("token_id", ("tokens", bad), msg))
    return errors + _name_errors(body)


def _parse_and_hash(controller: Controller, raw: bytes, hashers: list[TokenHasher]) -> tuple[LookupQuery, Any]:
    query = parse_lookup(raw)
    return query, controller.hash_lookup(query.tokens, hashers)


async def answer_lookup(controller: Controller, raw: bytes, limiter: anyio.CapacityLimiter | None = None) -> bytes:
    """The JSON answer to a ``/lookup`` body (one event id per lookup, for /check_finish).

    Bodies over ``OFF_LOOP_BYTES`` are parsed and hashed in a worker thread (under ``limiter``);
    only the index look-up, which reads state the loop changes, runs on the loop.
    """
    if len(raw) <= OFF_LOOP_BYTES:
        query = parse_lookup(raw)
        hashed = controller.hash_lookup(query.tokens)
    else:
        query, hashed = await anyio.to_thread.run_sync(
            _parse_and_hash, controller, raw, controller.lookup_hashers(), limiter=limiter
        )
    layout = controller.lookup_hashed(hashed, len(query.tokens), query.model, query.instance_id)
    controller.activity.note_lookup(len(query.tokens), layout)
    event_id = controller.events.start("lookup", status="finished")
    return orjson.dumps({"event_id": event_id, "layout_info": layout})


class LookupFastPath:
    """``POST /lookup`` served as raw ASGI, skipping the router, the dependency solving and the
    exception middleware (about a tenth of a lookup's CPU). ``ApiGuard`` has read the body
    within its limit; errors are shaped by ``errors.error_answer``, as the app shapes them.
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, body: bytes, send: Send) -> None:
        if self._limiter is None:  # made here: a limiter belongs to the running event loop
            self._limiter = anyio.CapacityLimiter(OFF_LOOP_THREADS)
        try:
            answer = await answer_lookup(self.controller, body, self._limiter)
        except Exception as exc:  # noqa: BLE001  # every failure gets the app's short answer
            status, detail = error_answer(exc, scope["path"])
            await send_json(send, status, detail)
            return
        await send_json(send, 200, answer)


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown instance or worker; the detail names the registered ones."},
}
#: what a command sent to every rank of an instance may answer besides 200
_COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    400: {"description": "Unknown location (the detail lists the instance's locations), or an operation "
          "this controller cannot do (the detail says why)."},
    413: {"description": "A body over 256 KiB (about 40,000 token ids)."},
    502: {"description": "A worker answered with an error or something unreadable."},
    504: {"description": "A worker did not answer within controller_command_timeout."},
}


def build_router() -> APIRouter:
    """The built-in endpoints (LMCache's controller API plus /instances and /metrics)."""
    router = APIRouter()

    @router.post(
        "/lookup",
        response_model=LookupResponse,
        responses={
            413: {
                "description": "More tokens than controller_max_lookup_tokens, "
                "or a body larger than controller_max_request_bytes."
            }
        },
        openapi_extra={"requestBody": _json_body(LookupRequest)},
    )
    async def lookup(request: Request) -> Response:
        """Which instances hold a prefix of the tokens, where, and how many tokens of it."""
        controller: Controller = request.app.state.controller
        return Response(await answer_lookup(controller, await request.body()), media_type="application/json")

    # create_app serves POSTs here through this raw ASGI handler instead (see its doc)
    lookup.lmcache_fast_path = LookupFastPath  # type: ignore[attr-defined]

    @router.post(
        "/clear",
        response_model=ClearResponse,
        response_model_exclude_none=True,
        responses={
            **_ERRORS,
            400: {"description": "Unknown location; the detail lists the instance's locations."},
            504: {"description": "A worker did not answer within controller_command_timeout."},
        },
    )
    async def clear(body: ClearRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Empty one location on every rank of an instance; returns the tokens removed."""
        return await controller.clear(body.instance_id, body.location)

    @router.post("/pin", response_model=ChunksResponse, response_model_exclude_none=True, responses=_COMMAND_ERRORS)
    async def pin(body: TokensAtLocationRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Protect the chunks of the tokens at one location of every rank from eviction
        (not from /clear); returns the tokens pinned."""
        return await controller.pin(body.instance_id, body.location, body.tokens)

    @router.post("/unpin", response_model=ChunksResponse, response_model_exclude_none=True, responses=_COMMAND_ERRORS)
    async def unpin(body: TokensAtLocationRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Make pinned chunks of the tokens at one location evictable again; returns the tokens unpinned."""
        return await controller.unpin(body.instance_id, body.location, body.tokens)

    @router.post("/move", response_model=ChunksResponse, response_model_exclude_none=True, responses={
        **_COMMAND_ERRORS,
        409: {"description": "A move between instances whose new instance serves no peer channel (enable_p2p)."},
    })
    async def move(body: MoveRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Move (or copy) chunks between two locations of one instance, on every rank, or between
        two instances over their peer channel (the chunks of ``tokens``); returns the tokens now
        at the new location."""
        return await controller.move(body.old_position, body.new_position, body.tokens, bool(body.should_copy))

    for endpoint in (pin, unpin, move):
        endpoint.lmcache_body_limit = TOKENS_BODY_BYTES  # type: ignore[attr-defined]  # see create_app

    @router.post("/query_instance", response_model=QueryInstanceResponse,
                 responses={404: {"description": "No worker registered that ip; the detail lists the known ones."}})
    async def query_instance(body: QueryInstanceRequest, controller: Controller = Depends(get_controller)) -> Any:
        """The instance whose workers registered this ip."""
        found = fleet.instances_at(controller, body.ip)
        event_id = controller.events.start("query_instance", status="finished")
        return {"event_id": event_id, "res": found[0], "instance_ids": found}

    @router.get("/controller/workers", response_model=WorkersResponse | WorkerSummary, responses=_ERRORS)
    async def workers(
        instance_id: str | None = Query(None, min_length=1, max_length=MAX_INSTANCE_ID_LENGTH),
        worker_id: int | None = Query(None, ge=0),
        controller: Controller = Depends(get_controller),
    ) -> Any:
        """Registered workers with their key counts: every one, an instance's, or (both given,
        as LMCache answers) that one worker alone."""
        found = fleet.worker_summaries(controller, instance_id, worker_id)
        if instance_id is not None and worker_id is not None:
            return found[0]
        return {"workers": found, "total_count": len(found)}

    @router.get("/controller/key-stats", response_model=KeyStatsResponse)
    async def key_stats(controller: Controller = Depends(get_controller)) -> Any:
        """Chunks ("keys") and workers per instance, and their totals."""
        return fleet.key_stats(controller)
    recode_errors: dict[int | str, dict[str, Any]] = {
        **_ERRORS,
        400: {
            "description": "Unknown location or codec (the detail lists the available ones), "
            "or a codec that cannot do this at that location."
        },
        504: {"description": "A worker did not answer within controller_command_timeout."},
    }

    @router.post("/compress", response_model=RecodeResponse, response_model_exclude_none=True, responses=recode_errors)
    async def compress(body: RecodeRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Re-encode one location's chunks with codec ``method`` on every rank, in place;
        returns the tokens re-encoded. Reads decode transparently; ``/lookup`` is unchanged."""
        return await controller.recode("compress", body.instance_id, body.method, body.location, body.tokens)

    @router.post("/decompress", response_model=RecodeResponse, response_model_exclude_none=True, responses=recode_errors)
    async def decompress(body: RecodeRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Store the chunks codec ``method`` encoded at one location as they are again, on every
        rank; returns their tokens (a lossy codec's loss stays)."""
        return await controller.recode("decompress", body.instance_id, body.method, body.location, body.tokens)

    @router.post("/check_finish", response_model=CheckFinishResponse, responses={404: {"description": "Unknown event id."}})
    async def check_finish(body: CheckFinishRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Status of an event id returned by another endpoint."""
        result = controller.check_finish(body.event_id)
        if result is None:
            raise HTTPException(404, f"unknown event id '{body.event_id}'")
        return result

    @router.post("/health", response_model=HealthResponse, responses=_ERRORS)
    async def health(body: HealthRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Ping every rank of an instance; error code 0 per rank that answered."""
        return await controller.health(body.instance_id)

    @router.get("/instances", response_model=InstancesResponse)
    async def instances(controller: Controller = Depends(get_controller)) -> Any:
        """Every registered instance with its workers, locations and counts."""
        return {"instances": controller.instance_infos()}

    @router.post("/query_worker_info", response_model=QueryWorkerInfoResponse, responses=_ERRORS)
    async def query_worker_info(
        body: QueryWorkerInfoRequest, controller: Controller = Depends(get_controller)
    ) -> Any:
        """Workers of an instance (or of every instance: 'all'): locations, chunk and token
        counts, address, registration and last heartbeat."""
        infos = controller.worker_infos(body.instance_id, body.worker_ids)
        return {"event_id": controller.events.start("query_worker_info", status="finished"), "worker_infos": infos}

    @router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics(controller: Controller = Depends(get_controller)) -> Response:
        """Prometheus metrics of this controller."""
        return Response(controller.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


@hookimpl
def lmcache_controller_routes() -> list[Any]:
    return [build_router()]
