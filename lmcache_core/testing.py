"""Reusable pytest fixtures for lmcache-core and its plugins (a pytest plugin, ``-p lmcache``).

Installed with lmcache-core through the ``pytest11`` entry point, so outside plugin authors get
the same fixtures: a fresh plugin manager, settings bound to a temporary directory, and (with
the NATS transport installed) a real ``nats-server`` on a free port.

``running_nats_server()`` is the same server as a plain context manager, for benchmarks and
examples outside pytest. ``FaultyBus`` wraps a connected bus to drop, hold, delay, reorder or
duplicate what is published through it, following a ``FaultPlan``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import anyio
import pluggy
import pytest

from lmcache_core.errors import PluginError, RequestTimeout
from lmcache_core.transport import Handler, MessageBus, Subscription

if TYPE_CHECKING:
    from lmcache_transport_nats.server import NatsServerProcess


#: ports free_port handed out lately: the kernel may offer a just-closed port again, and two
#: calls before either port is bound (a server and its monitoring port) must not get the same one
_recent_ports: deque[int] = deque(maxlen=256)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, and not one of the last ports this returned."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _recent_ports:
            _recent_ports.append(port)
            return port


@pytest.fixture
def plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[pluggy.PluginManager]:
    """A fresh plugin manager with every installed plugin, unaffected by the caller's env switches."""
    from lmcache_core.plugins import get_plugin_manager

    monkeypatch.delenv("LMCACHE_PLUGINS", raising=False)
    monkeypatch.delenv("LMCACHE_DISABLE_PLUGINS", raising=False)
    yield get_plugin_manager()


def _nats_server_class() -> type["NatsServerProcess"]:
    try:
        from lmcache_transport_nats.server import NatsServerProcess
    except ImportError as exc:
        raise PluginError(
            "a NATS server needs the NATS transport plugin: "
            "pip install lmcache-transport-nats (in this repository: pip install -e plugins/transport_nats)"
        ) from exc
    return NatsServerProcess


@contextlib.contextmanager
def running_nats_server(
    host: str = "127.0.0.1", port: int | None = None, **options: Any
) -> Iterator["NatsServerProcess"]:
    """A real ``nats-server`` on ``host:port`` (a free port when None) for the block.

    Yields the server: ``.url``, ``.port``, ``.pid``, ``.stop()`` and ``.start()`` (which
    restarts it on the same port, for reconnect tests). ``options`` go to
    ``NatsServerProcess`` (``authorization``, ``user``/``password``, ``token``, ``args``).
    Needs the NATS transport plugin; without it ``PluginError`` says what to install.
    """
    server = _nats_server_class()(host, port, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server() -> Iterator["NatsServerProcess"]:
    """A real ``nats-server`` on a free loopback port, stopped after the test."""
    try:
        _nats_server_class()
    except PluginError as exc:
        pytest.fail(str(exc), pytrace=False)  # a missing plugin is a broken setup, not a skip
    with running_nats_server() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: "NatsServerProcess") -> str:
    """``nats://127.0.0.1:<port>`` of the test's ``nats_server``."""
    return nats_server.url


Fault = Literal["pass", "drop", "hold", "duplicate", "delay", "reorder"]


class FaultPlan:
    """What happens to each message published on topics starting with ``prefix`` (default:
    event batches): the next actions in order, then ``then``. Other topics pass.
    ``delay`` is how long a "delay" holds a message back.

    >>> plan = FaultPlan("hold", "drop")
    >>> [plan("events.a.0", b""), plan("heartbeat.a.0", b""), plan("events.a.0", b""), plan("events.a.0", b"")]
    ['hold', 'pass', 'drop', 'pass']
    """

    def __init__(self, *actions: Fault, prefix: str = "events.", then: Fault = "pass", delay: float = 0.1) -> None:
        self.actions: deque[Fault] = deque(actions)
        self.prefix = prefix
        self.then = then
        self.delay = delay

    def __call__(self, topic: str, payload: bytes) -> Fault:
        if not topic.startswith(self.prefix):
            return "pass"
        return self.actions.popleft() if self.actions else self.then


class FaultyBus(MessageBus):
    """``inner`` with faults injected into what is published through it: ``plan(topic,
    payload)`` says

    * "pass", "drop", or "duplicate" (published twice);
    * "hold": kept until ``release()`` (a delay; released in reverse, a reorder);
    * "delay": kept for ``plan.delay`` seconds (default 0.1), then published by the first
      publish through this bus after that (a worker's heartbeats publish every interval), so
      what was published meanwhile overtakes it;
    * "reorder": kept until the next message the plan lets through (its topic prefix), then
      published right after it: the two arrive swapped.

    Nothing runs in the background: what is kept goes out on a later ``publish`` or on
    ``release()``, which sends everything still kept. A request meets "delay" (sent late) and
    "drop" (it times out). Everything else is ``inner``'s.
    """

    def __init__(self, inner: MessageBus, plan: Callable[[str, bytes], Fault]) -> None:
        self.inner = inner
        self.plan = plan
        self.held: list[tuple[str, bytes]] = []
        self.dropped: list[tuple[str, bytes]] = []
        #: "delay"ed messages and the monotonic time each may go
        self.delayed: list[tuple[float, str, bytes]] = []
        #: "reorder"ed messages, waiting for the next one to overtake them
        self.swapped: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        action = self.plan(topic, payload)
        if action == "drop":
            self.dropped.append((topic, payload))
        elif action == "hold":
            self.held.append((topic, payload))
        elif action == "delay":
            delay = getattr(self.plan, "delay", 0.1)
            self.delayed.append((time.monotonic() + delay, topic, payload))
        elif action == "reorder":
            self.swapped.append((topic, payload))
        else:
            await self.inner.publish(topic, payload)
            if action == "duplicate":
                await self.inner.publish(topic, payload)
            if self.swapped and topic.startswith(getattr(self.plan, "prefix", "")):
                swapped, self.swapped = self.swapped, []
                for kept in swapped:
                    await self.inner.publish(*kept)
        await self._publish_due()

    async def _publish_due(self) -> None:
        if not self.delayed:
            return
        now = time.monotonic()
        due = [item for item in self.delayed if item[0] <= now]
        if due:
            self.delayed = [item for item in self.delayed if item[0] > now]
            for _, topic, payload in due:
                await self.inner.publish(topic, payload)

    @property
    def kept(self) -> int:
        """Messages held, delayed or waiting to be overtaken, not yet published."""
        return len(self.held) + len(self.delayed) + len(self.swapped)

    async def release(self, reverse: bool = False) -> int:
        """Publish what was held (oldest first, or newest first), then whatever a "delay" or
        "reorder" still keeps; returns how many."""
        held, self.held = self.held, []
        rest = [(topic, payload) for _, topic, payload in self.delayed] + self.swapped
        self.delayed, self.swapped = [], []
        for topic, payload in [*(reversed(held) if reverse else held), *rest]:
            await self.inner.publish(topic, payload)
        return len(held) + len(rest)

    async def request(self, topic: str, payload: bytes, timeout: float) -> bytes:
        """``inner``'s request, sent ``plan.delay`` seconds late on "delay"; on "drop" nobody
        hears it (``RequestTimeout`` after ``timeout``). Other actions let a request through."""
        action = self.plan(topic, payload)
        if action == "drop":
            self.dropped.append((topic, payload))
            await anyio.sleep(timeout)
            raise RequestTimeout(f"request on {topic} dropped by the fault plan")
        if action == "delay":
            await anyio.sleep(getattr(self.plan, "delay", 0.1))
        return await self.inner.request(topic, payload, timeout)

    async def subscribe(self, topic: str, handler: Handler) -> Subscription:
        return await self.inner.subscribe(topic, handler)

    async def flush(self, timeout: float = 5.0) -> None:
        await self.inner.flush(timeout)

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self.inner.on_reconnect(callback)

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    async def aclose(self) -> None:
        await self.inner.aclose()


class Proxy:
    """A TCP proxy for fault tests (real sockets): forwards one connection to ``target``
    (``host:port``) from ``listen``; from byte ``corrupt_at`` of the server's answer it flips one
    byte, and after ``stall_after`` bytes it stops forwarding (``stalled`` is set) until
    ``cut()`` closes both sides."""

    def __init__(
        self,
        target: str,
        *,
        corrupt_at: int | None = None,
        stall_after: int | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.corrupt_at = corrupt_at
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self.forwarded = 0
        self._listener = socket.create_server(listen)
        self.url = f"{listen[0]}:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self.target)
        self._socks += [client, server]
        for args in ((client, server, False), (server, client, True)):
            t = threading.Thread(target=self._pump, args=args, daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if answers:
                    start = self.forwarded
                    if self.stall_after is not None and start + len(data) > self.stall_after:
                        data = data[: max(0, self.stall_after - start)]
                        dst.sendall(data)
                        self.forwarded += len(data)
                        self.stalled.set()
                        return
                    if self.corrupt_at is not None and start <= self.corrupt_at < start + len(data):
                        data[self.corrupt_at - start] ^= 0xFF
                    self.forwarded += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not answers or self.stall_after is None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def cut(self) -> None:
        for sock in [self._listener, *self._socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
