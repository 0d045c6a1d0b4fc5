"""The controller's built-in HTTP endpoints, contributed through ``lmcache_controller_routes``.

Handlers stay thin: they validate the body (pydantic), call the ``Controller`` and shape the
answer; errors are ``LMCacheError``s that the app turns into JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

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
    async def lookup(request: Request, controller: Controller = Depends(get_controller)) -> Response:
        """Which instances hold a prefix of the tokens, where, and how many tokens of it."""
        # the hot path: parse and validate the raw body in one pass (pydantic-core), convert
        # the tokens to int64 once, and write the answer without a second validation
        body = parse_body(LookupRequest, await request.body())
        try:
            tokens = np.fromiter(body.tokens, dtype=np.int64, count=len(body.tokens))
        except OverflowError:
            raise RequestValidationError(
                [{"type": "int64_range", "loc": ("body", "tokens"), "msg": "token ids must fit in a signed 64-bit integer", "input": None}]
            ) from None
        layout = controller.lookup(tokens, model=body.model, instance_id=body.instance_id)
        event_id = controller.events.start("lookup", status="finished")
        return Response(json.dumps({"event_id": event_id, "layout_info": layout}), media_type="application/json")

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
