"""The controller's FastAPI application: every plugin's routers, auth, metrics and JSON errors."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

import pluggy
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmcache_core.controller.errors import http_status
from lmcache_core.controller.state import Controller
from lmcache_core.errors import LMCacheError
from lmcache_core.plugins import controller_routers, get_plugin_manager

log = logging.getLogger(__name__)


class ApiGuard:
    """Pure ASGI middleware: bearer-token check on every path, and per-route latency.

    Written as raw ASGI rather than ``BaseHTTPMiddleware`` because that one costs a task and
    a stream per request, which the lookup path cannot afford. ``fast_paths`` maps a path to a
    raw handler called as ``handler(scope, receive, send, fallback)``, ``fallback`` being the
    rest of the application (see ``routes.LookupFastPath``).
    """

    def __init__(
        self,
        app: ASGIApp,
        controller: Controller,
        token: str | None,
        routes: set[str],
        fast_paths: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.fast_paths = fast_paths or {}
        self.histogram = controller.metrics.request_latency
        self.expected = f"Bearer {token}".encode() if token else None
        self.routes = routes
        self._children: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if self.expected is not None and not self._authorized(scope):
            await _send_json(send, 401, {"detail": "missing or wrong bearer token"}, [(b"www-authenticate", b"Bearer")])
        else:
            fast = self.fast_paths.get(scope["path"])
            if fast is None:
                await self.app(scope, receive, send)
            else:
                await fast(scope, receive, send, self.app)
        path = scope["path"]
        route = path if path in self.routes else "other"
        child = self._children.get(route)
        if child is None:
            child = self._children[route] = self.histogram.labels(route)
        child.observe(time.perf_counter() - started)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)  # type: ignore[arg-type]
        return False


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


def create_app(controller: Controller, pm: pluggy.PluginManager | None = None) -> FastAPI:
    """The HTTP API of ``controller``: every router plugins contribute, OpenAPI at ``/docs``."""
    pm = pm if pm is not None else get_plugin_manager()
    app = FastAPI(
        title="lmcache-core cache controller",
        description="Which instance holds a prompt's prefix, and clearing what an instance holds.",
        version="1",
    )
    app.state.controller = controller
    for router in controller_routers(pm):
        app.include_router(router)

    @app.exception_handler(LMCacheError)
    async def lmcache_error(request: Request, exc: LMCacheError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500 and status not in (502, 504):
            log.error("request %s failed", request.url.path, exc_info=exc)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s failed unexpectedly", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    routes = {getattr(r, "path", "") for r in app.routes}
    # a route whose endpoint names a raw handler (``lmcache_fast_path``) is served by it, when
    # that route is the first one at its path (the one Starlette would pick)
    fast_paths: dict[str, Any] = {}
    seen: set[str] = set()
    for route in app.routes:
        path = getattr(route, "path", "")
        factory = getattr(getattr(route, "endpoint", None), "lmcache_fast_path", None)
        if path not in seen and factory is not None:
            fast_paths[path] = factory(controller)
        seen.add(path)
    app.add_middleware(
        ApiGuard,
        controller=controller,
        token=controller.settings.controller_api_token,
        routes=routes,
        fast_paths=fast_paths,
    )
    return app
