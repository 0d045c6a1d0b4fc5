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
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Scope, Send

from lmcache_core.controller.asgi import send_json
from lmcache_core.controller.deps import get_controller
from lmcache_core.controller.errors import MAX_ERRORS, error_answer
from lmcache_core.controller.models import (
    CheckFinishRequest,
    CheckFinishResponse,
    ClearRequest,
    ClearResponse,
    HealthRequest,
    HealthResponse,
    InstancesResponse,
    MAX_INSTANCE_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_TOKEN_ID,
    LookupRequest,
    LookupResponse,
    QueryWorkerInfoRequest,
    QueryWorkerInfoResponse,
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
        """Workers of an instance: locations, chunk and token counts, last heartbeat."""
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
