"""The controller's FastAPI application: every plugin's routers, auth, metrics and JSON errors."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import pluggy
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmcache_core.controller.asgi import CLOSE, deny_websocket, read_body, replay, send_json
from lmcache_core.controller.errors import error_answer
from lmcache_core.controller.state import Controller
from lmcache_core.errors import LMCacheError
from lmcache_core.plugins import controller_routers, get_plugin_manager


#: largest body of an endpoint without its own limit (the built-in ones take a few ids)
SMALL_BODY_BYTES = 64 * 1024
_UNAUTHORIZED = {"detail": "missing or wrong bearer token"}


class ApiGuard:
    """Pure ASGI middleware in front of every route: the bearer token, bounded request bodies,
    and per-route latency.

    Written as raw ASGI rather than ``BaseHTTPMiddleware`` because that one costs a task and
    a stream per request, which the lookup path cannot afford. Every HTTP body is read here,
    within its path's limit (``body_limits``: path -> (bytes, what the refusal says); others
    ``SMALL_BODY_BYTES``) and ``body_timeout``, then replayed to the application; a refusal
    closes the connection. ``fast_paths`` maps a path to a raw handler that answers a POST
    itself, called as ``handler(scope, body, send)`` (see ``routes.LookupFastPath``).

    With a token, every scope but lifespan needs it: HTTP gets 401, a websocket handshake is
    refused, and any other kind of scope never reaches the application. The one exception is a
    GET of a ``public_paths`` path: files holding no data (the web page, which asks for the token).
    """

    def __init__(
        self,
        app: ASGIApp,
        controller: Controller,
        token: str | None,
        routes: set[str],
        fast_paths: dict[str, Any] | None = None,
        body_limits: dict[str, tuple[int, str]] | None = None,
        body_timeout: float = 30.0,
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.public_paths = public_paths
        self.fast_paths = fast_paths or {}
        self.body_limits = body_limits or {}
        self.body_timeout = body_timeout
        self.histogram = controller.metrics.request_latency
        self.expected = hashlib.sha256(f"Bearer {token}".encode()).digest() if token is not None else None
        self.routes = routes
        self._children: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" or self._authorized(scope):
                await self.app(scope, receive, send)
            elif scope["type"] == "websocket":
                await deny_websocket(scope, send, 401, _UNAUTHORIZED)
            return
        started = time.perf_counter()
        path = scope["path"]
        if self._authorized(scope) or (path in self.public_paths and scope["method"] == "GET"):
            await self._serve(scope, receive, send, path)
        else:
            await send_json(send, 401, _UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
        route = path if path in self.routes else "other"
        child = self._children.get(route)
        if child is None:
            child = self._children[route] = self.histogram.labels(route)
        child.observe(time.perf_counter() - started)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        limit, accepts = self.body_limits.get(path) or (SMALL_BODY_BYTES, _accepts(path, SMALL_BODY_BYTES))
        try:
            body = await read_body(scope, receive, limit, self.body_timeout, accepts)
        except LMCacheError as exc:
            status, answer = error_answer(exc, path)
            await send_json(send, status, answer, [CLOSE])
            return
        if body is None:
            return  # the client went away
        fast = self.fast_paths.get(path)
        if fast is not None and scope["method"] == "POST":
            await fast(scope, body, send)
        else:
            await self.app(scope, replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None:
            return True
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # digests have one length whatever was sent, so the comparison's time tells nothing
        return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected)


def _accepts(path: str, size: int, setting: str | None = None) -> str:
    """What a refused body's answer says an endpoint takes."""
    return f"{path} accepts at most {size} bytes" + (f" ({setting})" if setting else "")


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

    async def answer_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = error_answer(exc, request.url.path)
        return JSONResponse(body, status_code=status)

    # malformed bodies (422), our errors, and anything unexpected (500): short, never the input
    for kind in (RequestValidationError, LMCacheError, Exception):
        app.add_exception_handler(kind, answer_error)

    routes = {getattr(r, "path", "") for r in app.routes}
    # a route whose endpoint names a raw handler (``lmcache_fast_path``) is served by it, when
    # that route is the first one at its path (the one Starlette would pick)
    fast_paths: dict[str, Any] = {}
    seen: set[str] = set()
    # a route whose endpoint is marked ``lmcache_public`` holds no data (the web page's files):
    # a GET of it needs no token
    public_paths: set[str] = set()
    for route in app.routes:
        path = getattr(route, "path", "")
        endpoint = getattr(route, "endpoint", None)
        factory = getattr(endpoint, "lmcache_fast_path", None)
        if path not in seen and factory is not None:
            fast_paths[path] = factory(controller)
        if path not in seen and getattr(endpoint, "lmcache_public", False):
            public_paths.add(path)
        seen.add(path)
    settings = controller.settings
    lookup_limit = settings.controller_max_request_bytes
    # the raw paths (/lookup) take token lists; so do routes whose endpoint names its own limit
    # (``lmcache_body_limit``: /pin, /move ...); every other endpoint a few ids
    body_limits = {
        path: (lookup_limit, _accepts(path, lookup_limit, "controller_max_request_bytes")) for path in fast_paths
    }
    for route in app.routes:
        limit = getattr(getattr(route, "endpoint", None), "lmcache_body_limit", None)
        path = getattr(route, "path", "")
        if limit is not None and path not in body_limits:
            body_limits[path] = (limit, _accepts(path, limit))
    app.add_middleware(
        ApiGuard,
        controller=controller,
        token=settings.controller_api_token,
        routes=routes,
        fast_paths=fast_paths,
        body_limits=body_limits,
        body_timeout=settings.controller_request_timeout,
        public_paths=frozenset(public_paths),
    )
    return app
