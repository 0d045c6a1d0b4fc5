"""FastAPI dependencies: how route handlers (built-in or a plugin's) reach the running controller."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from lmcache_core.controller.state import Controller


async def get_controller(request: Request) -> "Controller":
    """The controller serving this request (use as ``Depends(get_controller)``).

    Example::

        @router.get("/workers/count")
        def count(controller: Controller = Depends(get_controller)) -> int:
            return len(controller.workers)

    Async on purpose: FastAPI runs a sync dependency in a worker thread, a thread hop per
    request that costs more than a whole lookup.
    """
    return request.app.state.controller
