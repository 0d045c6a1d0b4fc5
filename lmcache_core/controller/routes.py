"""The controller's built-in HTTP endpoints, contributed through ``lmcache_controller_routes``.

Handlers stay thin: they validate the body (pydantic), call the ``Controller`` and shape the
answer; errors are ``LMCacheError``s that the app turns into JSON ``{"detail": ...}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

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
    )
    async def lookup(body: LookupRequest, controller: Controller = Depends(get_controller)) -> Any:
        """Which instances hold a prefix of the tokens, where, and how many tokens of it."""
        layout = controller.lookup(body.tokens, model=body.model, instance_id=body.instance_id)
        return {"event_id": controller.events.start("lookup", status="finished"), "layout_info": layout}

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
