"""Running a controller: the transport (optionally its embedded server), the bus subscriptions,
housekeeping and the HTTP server, all owned by one anyio task group.

``running_controller(...)`` is an async context manager yielding a ``ControllerHandle`` once
everything accepts work; leaving it stops everything it started, in reverse order (HTTP server,
subscriptions and background tasks, bus connection, embedded message server).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
import pluggy
import uvicorn

from lmcache_core.config import LMCacheSettings
from lmcache_core.controller.app import create_app
from lmcache_core.controller.page import page_clock
from lmcache_core.controller.state import Controller
from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.netaddr import is_loopback
from lmcache_core.plugins import get_plugin_manager, resolve_transport

log = logging.getLogger(__name__)

#: seconds the HTTP server gets to finish in-flight requests on shutdown
SHUTDOWN_GRACE = 5.0


@dataclass
class ControllerHandle:
    """A running controller: its state, where its HTTP API listens and its bus URL."""

    controller: Controller
    host: str
    port: int
    bus_url: str | None
    server: uvicorn.Server
    #: set when the HTTP server has exited (asked to, or on its own)
    served: anyio.Event

    #: True when the HTTP API speaks TLS (``ssl_certfile`` given)
    tls: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def check_http_exposure(settings: LMCacheSettings, host: str) -> None:
    """``ConfigError`` when the HTTP API would listen beyond loopback without an API token:
    anyone reaching it could clear every instance."""
    if settings.controller_api_token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the HTTP API on {host!r} (not loopback) without an API token: "
            "give --api-token or set LMCACHE_CONTROLLER_API_TOKEN (controller_api_token), "
            "or listen on localhost"
        )


def tls_options(certfile: str | None, keyfile: str | None) -> dict[str, str]:
    """uvicorn's TLS options for the HTTP API, after checking both files can be read;
    ``ConfigError`` naming the option otherwise."""
    if certfile is None and keyfile is None:
        return {}
    if certfile is None or keyfile is None:
        missing = "--ssl-certfile" if certfile is None else "--ssl-keyfile"
        raise ConfigError(f"TLS for the HTTP API needs both --ssl-certfile and --ssl-keyfile; {missing} is missing")
    import ssl

    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not os.path.isfile(path):
            raise ConfigError(f"{option} {path!r}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--ssl-certfile {certfile!r} and --ssl-keyfile {keyfile!r} are not a PEM certificate "
            f"and its private key: {exc}"
        ) from None
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile}


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the controller's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; ``ConfigError`` in one line when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    sock.setblocking(False)
    return sock


#: most bytes of request line and headers a request may have (larger: 400, disconnected)
MAX_HEAD_BYTES = 64 * 1024


def _http_protocol(head_timeout: float) -> str | type[asyncio.Protocol]:
    """uvicorn's httptools protocol (the C parser is several times faster than h11) with a
    deadline and a size bound on each request's head; plain h11 where httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class BoundedHeadProtocol(HttpToolsProtocol):
        """A client has ``head_timeout`` seconds from connecting (or from the first byte of a
        later request) to send its request line and headers, at most ``MAX_HEAD_BYTES`` of
        them; a slower one is disconnected. uvicorn alone waits forever and keeps all it gets.
        """

        _head_deadline: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._head_deadline is None:
                self._arm_head_deadline()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._cancel_head_deadline()
            super().on_headers_complete()

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                raise ValueError("request head too large")  # the parser answers 400 and closes

        def _arm_head_deadline(self) -> None:
            self._head_deadline = self.loop.call_later(head_timeout, self._head_too_slow)

        def _cancel_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return BoundedHeadProtocol


@contextlib.asynccontextmanager
async def running_controller(
    settings: LMCacheSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    nats_url: str | None = None,
    monitor_port: int | None = None,
    pm: pluggy.PluginManager | None = None,
    controller_factory: type[Controller] = Controller,
    startup_timeout: float = 30.0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> AsyncIterator[ControllerHandle]:
    """Run a controller for the duration of the block.

    Give ``monitor_port`` to start the transport's embedded server on ``host:monitor_port``, or
    ``nats_url`` to use an existing server (neither: the settings' ``controller_address``).
    ``port=0`` picks a free HTTP port (see ``handle.port``). ``ssl_certfile`` and
    ``ssl_keyfile`` (PEM) serve the API over HTTPS. A non-loopback ``host`` needs the settings'
    ``controller_api_token``.
    """
    check_http_exposure(settings, host)
    tls = tls_options(ssl_certfile, ssl_keyfile)
    pm = pm if pm is not None else get_plugin_manager()
    spec = resolve_transport(pm, settings.transport)
    if monitor_port is not None and spec.embedded_server is None:
        raise ConfigError(f"transport '{spec.name}' cannot run an embedded server; use an existing one")
    sock = listen_socket(host, port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                with anyio.fail_after(startup_timeout):
                    url = nats_url or settings.controller_address
                    if monitor_port is not None:
                        assert spec.embedded_server is not None
                        url = await stack.enter_async_context(spec.embedded_server(settings, host, monitor_port))
                    bus = await spec.connect(settings, url)
                    stack.push_async_callback(bus.aclose)
            except TimeoutError:
                raise LMCacheError(
                    f"the controller's message bus did not start within {startup_timeout:g} s"
                ) from None
            controller = controller_factory(settings, bus)
            app = create_app(controller, pm)
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                http=_http_protocol(settings.controller_request_timeout),
                timeout_graceful_shutdown=SHUTDOWN_GRACE,
                backlog=2048,
                # clients (routers, load balancers) keep connections open between lookups; a
                # short idle timeout races their next request and surfaces as a read error
                timeout_keep_alive=75,
                **tls,
            )
            server = _EmbeddedUvicorn(config)
            served = anyio.Event()

            async def serve() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    served.set()

            async with anyio.create_task_group() as tg:
                await controller.start(tg)
                tg.start_soon(page_clock, controller)
                tg.start_soon(serve)
                with anyio.move_on_after(startup_timeout) as waiting:
                    while not server.started and not served.is_set():
                        await anyio.sleep(0.005)
                if waiting.cancelled_caught or served.is_set():
                    tg.cancel_scope.cancel()
                    raise LMCacheError(f"the controller's HTTP server did not start within {startup_timeout:g} s")
                bound = sock.getsockname()
                handle = ControllerHandle(controller, host, int(bound[1]), url, server, served, tls=bool(tls))
                try:
                    yield handle
                finally:
                    with anyio.CancelScope(shield=True):
                        controller.feed.close()  # open event streams end, so the server stops at once
                        server.should_exit = True
                        with anyio.move_on_after(SHUTDOWN_GRACE + 1.0):
                            await served.wait()
                        await controller.stop()
                    tg.cancel_scope.cancel()
    finally:
        sock.close()
