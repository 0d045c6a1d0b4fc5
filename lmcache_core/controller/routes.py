"""The controller's built-in HTTP endpoints, contributed through ``lmcache_controller_routes``.

Handlers stay thin: they validate the body (pydantic), call the ``Controller`` and shape the
answer; errors are ``LMCacheError``s that the app turns into JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmcache_core.controller.deps import get_controller
from lmcache_core.controller.models import (
    CheckFinishRequest,
    CheckFinishResponse,
    ClearRequest,
    ClearResponse,
    HealthRequest,
    HealthResponse,
    InstancesResponse,
    LookupRequest,
    LookupResponse,
    QueryWorkerInfoRequest,
    QueryWorkerInfoResponse,
)
from lmcache_core.controller.state import Controller
from lmcache_core.hookspecs import hookimpl

M = TypeVar("M", bound=BaseModel)

def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI requestBody for a route that parses its body itself."""
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


def parse_body(model: type[M], raw: bytes) -> M:
    """``raw`` JSON validated as ``model``; errors become FastAPI's usual 422 with field paths."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        for error in errors:
            error["loc"] = ("body", *error["loc"])
        raise RequestValidationError(errors) from None


_LOOKUP_FIELDS = frozenset(LookupRequest.model_fields)
_INT64_RANGE_ERROR = {
    "type": "int64_range",
    "loc": ("body", "tokens"),
    "msg": "token ids must fit in a signed 64-bit integer",
    "input": None,
}


def _plain_lookup_body(raw: bytes) -> tuple[np.ndarray, str | None, str | None] | None:
    """(int64 tokens, model, instance_id) of a plain, well-formed ``/lookup`` body, or ``None``
    for anything else (which then takes the validating path and gets its exact 422).

    Why: validating 8k tokens with pydantic and converting them with numpy cost about half
    of a lookup; orjson plus one ``struct.pack`` do the same at C speed. The result is the
    same for every body accepted here: JSON integers that fit in int64 (``struct`` raises on
    anything else: floats, strings, out-of-range ids), the model's field names only, and
    strings or nulls for the two filters.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict or not body.keys() <= _LOOKUP_FIELDS:
        return None
    tokens = body.get("tokens")
    model = body.get("model")
    instance_id = body.get("instance_id")
    if (
        type(tokens) is not list
        or (model is not None and type(model) is not str)
        or (instance_id is not None and type(instance_id) is not str)
    ):
        return None
    try:
        # one C call for the whole list; 3x cheaper than filling an array('q') here
        packed = struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error:
        return None
    return np.frombuffer(packed, dtype="<i8"), model, instance_id


def _validated_lookup_body(raw: bytes) -> tuple[np.ndarray, str | None, str | None]:
    """The validating path: pydantic's 422 with field paths for any malformed body."""
    body = parse_body(LookupRequest, raw)
    try:
        tokens = np.fromiter(body.tokens, dtype=np.int64, count=len(body.tokens))
    except OverflowError:
        raise RequestValidationError([_INT64_RANGE_ERROR]) from None
    return tokens, body.model, body.instance_id


def _lookup_answer(controller: Controller, tokens: np.ndarray, model: str | None, instance_id: str | None) -> bytes:
    """The JSON body of a ``/lookup`` answer (one event id per lookup, for /check_finish)."""
    layout = controller.lookup(tokens, model=model, instance_id=instance_id)
    event_id = controller.events.start("lookup", status="finished")
    return orjson.dumps({"event_id": event_id, "layout_info": layout})


_JSON_HEADERS = [(b"content-type", b"application/json")]


class LookupFastPath:
    """``POST /lookup`` served as raw ASGI for plain bodies that succeed, skipping the router,
    the dependency solving and the exception middleware (about a tenth of a lookup's CPU).

    Anything else (another method, a body the plain parser declines, an error) is handed to
    ``fallback``, the full application, with the body replayed: the FastAPI route then gives
    the exact answer (422, 413, ...), so error shaping lives in one place.
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp) -> None:
        if scope["method"] != "POST":
            await fallback(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        parsed = _plain_lookup_body(raw)
        body = None
        if parsed is not None:
            try:
                body = _lookup_answer(self.controller, *parsed)
            except Exception:  # noqa: BLE001  # the FastAPI route repeats the call and shapes the error
                body = None
        if body is None:
            await fallback(scope, _replay(raw, receive), send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the real one."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown instance or worker; the detail names the registered ones."},
}


def build_router() -> APIRouter:
    """The built-in endpoints (LMCache's controller API plus /instances and /metrics)."""
    router = APIRouter()

    @router.post(
        "/lookup",
        response_model=LookupResponse,
        responses={413: {"description": "More tokens than controller_max_lookup_tokens."}},
        openapi_extra={"requestBody": _json_body(LookupRequest)},
    )
    async def lookup(request: Request) -> Response:
        """Which instances hold a prefix of the tokens, where, and how many tokens of it."""
        # the hot path: parse the raw body at C speed (validating fully only when it is not
        # plain), and write the answer without a second validation. The controller is read
        # from the app state directly: a Depends costs a dependency solve per request
        raw = await request.body()
        parsed = _plain_lookup_body(raw) or _validated_lookup_body(raw)
        controller: Controller = request.app.state.controller
        return Response(_lookup_answer(controller, *parsed), media_type="application/json")

    # create_app serves plain, successful lookups through this raw ASGI handler (see its doc)
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
