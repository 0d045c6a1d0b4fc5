"""``MessageBus`` on nats-py: publish/subscribe/request under a subject prefix, with reconnects.

nats-py does the reconnecting: subscriptions are replayed and publishes made while
disconnected wait in its pending buffer (``nats_pending_bytes``) and go out after the
reconnect. This module maps nats-py's errors to lmcache's and runs the ``on_reconnect``
callbacks in a task the bus owns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsPySubscription

from lmcache_core.errors import NoResponders, RequestTimeout, TransportError
from lmcache_core.transport import Handler, Message, MessageBus, Subscription
from lmcache_transport_nats.auth import inbox_prefix, prefixed
from lmcache_transport_nats.settings import NatsSettings, nats_settings_from, split_server_urls

log = logging.getLogger(__name__)

_SCHEMES = ("nats", "tls", "ws", "wss")
_DRAIN_TIMEOUT = 5  # seconds aclose() lets handlers finish queued messages
# Per-subscription queue limits: generous, because a dropped message is lost for good
# (the controller's event stream relies on seeing every event).
_SUB_PENDING_MSGS = 1_000_000
_SUB_PENDING_BYTES = 512 * 1024**2


def normalize_url(url: str) -> str:
    """``host:port`` -> ``nats://host:port``; ``TransportError`` for what nats-py cannot dial."""
    text = url.strip()
    if "://" not in text:
        text = f"nats://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise TransportError(f"bad NATS server URL {url!r}: {exc}") from exc
    if parts.scheme not in _SCHEMES:
        raise TransportError(
            f"bad NATS server URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}"
        )
    if not parts.hostname:
        raise TransportError(f"bad NATS server URL {url!r}: no host name")
    if port is None and parts.scheme in ("nats", "tls"):
        text = f"{text.rstrip('/')}:4222"  # the NATS default, made explicit for messages
    return text


def server_urls(settings: NatsSettings, url: str | None, fallback: str | None = None) -> list[str]:
    """The URLs to dial: ``nats_servers`` when set, else ``url``, else ``fallback``; ``url`` and
    ``fallback`` may name several servers, separated by commas (``--nats-url a:4222,b:4222``)."""
    if settings.nats_servers:
        chosen: Sequence[str] = settings.nats_servers
    elif url:
        chosen = split_server_urls(url)
    elif fallback:
        chosen = split_server_urls(fallback)
    else:
        raise TransportError(
            "no NATS server to connect to: set controller_url (host:port of the controller's "
            "--monitor-port) or nats_servers"
        )
    return [normalize_url(item) for item in chosen]


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca_file or settings.nats_tls_cert_file or settings.nats_tls_key_file):
        return None
    if bool(settings.nats_tls_cert_file) != bool(settings.nats_tls_key_file):
        raise TransportError("nats_tls_cert_file and nats_tls_key_file must be set together")
    try:
        context = ssl.create_default_context(
            cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None
        )
        if settings.nats_tls_cert_file and settings.nats_tls_key_file:
            context.load_cert_chain(
                str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file)
            )
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load the NATS TLS files: {exc}") from exc
    return context


def _auth_options(settings: NatsSettings) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.nats_password is not None and settings.nats_user is None:
        raise TransportError("nats_password is set but nats_user is not")
    if settings.nats_user is not None and settings.nats_nkey_seed_file is not None:
        raise TransportError("set either nats_user or nats_nkey_seed_file, not both")
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        options["password"] = (
            settings.nats_password.get_secret_value() if settings.nats_password else ""
        )
    if settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    signed = {
        "nats_creds_file": ("user_credentials", settings.nats_creds_file),
        "nats_nkey_seed_file": ("nkeys_seed", settings.nats_nkey_seed_file),
    }
    for key, (option, path) in signed.items():
        if path is None:
            continue
        try:
            import nkeys  # noqa: F401  (nats-py imports it lazily and fails late otherwise)
        except ImportError as exc:
            raise TransportError(f"{key} needs the 'nkeys' package: pip install nkeys") from exc
        if not path.is_file():
            raise TransportError(f"{key} {path} does not exist")
        options[option] = str(path)
    return options


def _is_fatal_on_connect(exc: BaseException) -> bool:
    """Errors that retrying cannot fix (wrong credentials, untrusted certificate)."""
    if isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError)):
        return True
    return "authorization" in str(exc).lower()


def _bus_error(action: str, exc: Exception) -> TransportError:
    """Our error for a nats-py failure of ``action`` (a closed bus said plainly)."""
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return TransportError(f"{action}: the NATS bus is closed")
    return TransportError(f"{action}: {exc}")


class NatsMessage(Message):
    """A message received from NATS; ``topic`` is relative to the bus prefix."""

    __slots__ = ("topic", "payload", "_reply", "_bus")

    def __init__(self, topic: str, payload: bytes, reply: str, bus: "NatsBus") -> None:
        self.topic = topic
        self.payload = payload
        self._reply = reply
        self._bus = bus

    async def respond(self, payload: bytes) -> None:
        """Answer the request this message carries."""
        if not self._reply:
            raise TransportError(f"the message on '{self.topic}' is not a request; cannot respond")
        await self._bus._publish_subject(self._reply, payload, what=f"reply to '{self.topic}'")

    def __repr__(self) -> str:
        return f"NatsMessage(topic={self.topic!r}, {len(self.payload)} bytes)"


class NatsSubscription(Subscription):
    """A live subscription; ``unsubscribe()`` is idempotent."""

    def __init__(self, sub: NatsPySubscription, topic: str) -> None:
        self._sub = sub
        self.topic = topic
        self._done = False

    def pending(self) -> int:
        return 0 if self._done else int(self._sub.pending_msgs)

    async def unsubscribe(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._sub.unsubscribe()
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            pass  # the connection (and with it the subscription) is already gone
        except nats.errors.Error as exc:
            raise TransportError(f"cannot unsubscribe from '{self.topic}': {exc}") from exc


class NatsBus(MessageBus):
    """A connected NATS client speaking relative topics under ``prefix``. Build with ``connect``."""

    def __init__(self, servers: list[str], prefix: str) -> None:
        self.servers = servers
        self.prefix = prefix
        self._nc = Client()
        self._callbacks: list[Callable[[], Awaitable[None]]] = []
        self._reconnected = asyncio.Event()
        self._reconnect_runner: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._connect_scope: anyio.CancelScope | None = None
        self._fatal_error: BaseException | None = None
        self._closed = False
        self._pending_limit = 0
        self._confirm_timeout = 5.0
        # flush()'s barrier: a private inbox this bus publishes tokens to and waits to hear back
        self._barrier_subject = ""
        self._barrier_tokens = itertools.count()
        self._barrier_waiters: dict[bytes, asyncio.Future[None]] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    async def _connect(self, settings: NatsSettings) -> None:
        auth = _auth_options(settings)
        options: dict[str, Any] = {
            "servers": self.servers,
            "dont_randomize": not settings.nats_randomize_servers,
            "connect_timeout": settings.nats_connect_timeout,
            "reconnect_time_wait": settings.nats_reconnect_wait,
            "max_reconnect_attempts": settings.nats_max_reconnect_attempts,
            "pending_size": settings.nats_pending_bytes,
            "drain_timeout": _DRAIN_TIMEOUT,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            # replies come under the user's own inbox, the one its bus permissions allow
            "inbox_prefix": inbox_prefix(settings),
            **auth,
        }
        tls = _tls_context(settings)
        if tls is not None:
            options["tls"] = tls
        self._pending_limit = settings.nats_pending_bytes
        self._confirm_timeout = max(5.0, settings.nats_connect_timeout)
        # One budget for the whole first connection: nats-py would otherwise retry forever
        # (nats_max_reconnect_attempts=-1), and a caller with a wrong URL must hear about it.
        budget = settings.nats_connect_timeout * max(1, len(self.servers))
        try:
            with anyio.CancelScope() as scope:
                self._connect_scope = scope
                scope.deadline = anyio.current_time() + budget
                try:
                    await self._nc.connect(**options)
                except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                    raise TransportError(self._connect_failure(exc, budget)) from exc
                finally:
                    self._connect_scope = None
            if scope.cancelled_caught or not self._nc.is_connected:
                cause = self._fatal_error or self._last_error
                raise TransportError(self._connect_failure(cause, budget)) from cause
            self._barrier_subject = self._nc.new_inbox()
            await self._nc.subscribe(self._barrier_subject, cb=self._on_barrier)
        except BaseException:
            # failed or cancelled half-way: close what nats-py started, so nothing retries on
            await self._abandon()
            raise
        self._reconnect_runner = asyncio.get_running_loop().create_task(
            self._run_reconnect_callbacks(), name=f"nats-on-reconnect[{self.prefix}]"
        )
        log.debug("connected to NATS at %s (prefix %r)", self._nc.connected_url, self.prefix)

    def _connect_failure(self, cause: BaseException | None, budget: float) -> str:
        urls = ", ".join(self.servers)
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"
        if self._fatal_error is not None:
            return (
                f"cannot connect to NATS at {urls}: the server refused us ({reason}); check "
                "nats_user/nats_password/nats_token/nats_nkey_seed_file/nats_creds_file and the "
                "TLS files"
            )
        return (
            f"cannot connect to NATS at {urls} within {budget:g}s ({reason}); check that a "
            "nats-server runs there (the controller starts one on its --monitor-port), that "
            "host and port are right, and that no firewall blocks it"
        )

    async def _abandon(self) -> None:
        """Close a client whose first connection failed, so nothing keeps retrying."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._nc.close()
            except Exception:  # best effort: it never connected
                log.debug("closing a failed NATS client", exc_info=True)

    async def aclose(self) -> None:
        """Let handlers finish queued messages, send buffered publishes, close; idempotent."""
        if self._closed:
            return
        self._closed = True
        runner, self._reconnect_runner = self._reconnect_runner, None
        if runner is not None:
            runner.cancel()
            if runner is not asyncio.current_task():  # an on_reconnect callback may close us
                await asyncio.gather(runner, return_exceptions=True)
        with anyio.CancelScope(shield=True):
            try:
                if self._nc.is_connected:
                    await self._nc.drain()
                if not self._nc.is_closed:
                    await self._nc.close()
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
                log.warning("NATS connection did not close cleanly: %s", exc)
                if not self._nc.is_closed:
                    await self._nc.close()

    # --- nats-py callbacks ---------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        if self._connect_scope is not None and _is_fatal_on_connect(exc):
            # the first connection can never succeed: stop the retry loop right away
            self._fatal_error = exc
            self._connect_scope.cancel()
            return
        # refused dials repeat every nats_reconnect_wait while a server is down: keep them quiet
        routine = self._connect_scope is not None or isinstance(exc, (OSError, asyncio.TimeoutError))
        log.log(
            logging.DEBUG if routine else logging.WARNING,
            "NATS (%s): %s: %s",
            ", ".join(self.servers),
            type(exc).__name__,
            exc,
        )

    async def _on_disconnected(self) -> None:
        if not self._closed and self._connect_scope is None:
            log.warning("disconnected from NATS; publishes are buffered until it reconnects")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self._nc.connected_url)
        # nats-py awaits this inside its reconnect loop: hand over, never block it
        self._reconnected.set()

    async def _on_closed(self) -> None:
        log.debug("NATS connection closed")

    async def _run_reconnect_callbacks(self) -> None:
        """Run the on_reconnect callbacks once per reconnection, one after another.

        Reconnections that happen while callbacks run fold into one more round, so a worker
        never resyncs twice at once.
        """
        while True:
            await self._reconnected.wait()
            self._reconnected.clear()
            for callback in list(self._callbacks):
                try:
                    await callback()
                except Exception:
                    log.exception("on_reconnect callback %r failed", callback)

    # --- ordering barrier -----------------------------------------------------------------------

    async def _on_barrier(self, msg: Msg) -> None:
        waiter = self._barrier_waiters.get(msg.data)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _barrier(self, timeout: float) -> None:
        """Return once the server has processed everything this bus sent before the call.

        nats-py's own ``flush()`` writes its PING straight to the socket, ahead of commands
        still in its pending buffer, so its PONG proves nothing about them. A message to our
        own inbox queues behind them instead: when it comes back, they were all processed.
        """
        token = str(next(self._barrier_tokens)).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barrier_waiters[token] = waiter
        try:
            await self._publish_subject(self._barrier_subject, token, what="a flush marker")
            with anyio.fail_after(timeout):
                await waiter
        finally:
            del self._barrier_waiters[token]

    # --- MessageBus ----------------------------------------------------------------------------

    def subject(self, topic: str) -> str:
        """The NATS subject of a relative ``topic``."""
        return prefixed(self.prefix, topic)

    def topic(self, subject: str) -> str:
        """The relative topic of a NATS ``subject`` received under this bus's prefix."""
        if self.prefix and subject.startswith(self.prefix + "."):
            return subject[len(self.prefix) + 1 :]
        return subject

    async def publish(self, topic: str, payload: bytes) -> None:
        await self._publish_subject(self.subject(topic), payload, what=f"'{topic}'")

    async def _publish_subject(self, subject: str, payload: bytes, *, what: str) -> None:
        try:
            await self._nc.publish(subject, payload)
        except nats.errors.OutboundBufferLimitError as exc:
            raise TransportError(
                f"cannot publish to {what}: disconnected from NATS and the reconnect buffer "
                f"(nats_pending_bytes={self._pending_limit}) is full"
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise TransportError(
                f"cannot publish to {what}: {len(payload)} bytes exceed the server's "
                f"max_payload ({self._nc.max_payload} bytes)"
            ) from exc
        except nats.errors.Error as exc:
            raise _bus_error(f"cannot publish to {what}", exc) from exc

    async def request(self, topic: str, payload: bytes, timeout: float) -> bytes:
        subject = self.subject(topic)
        try:
            reply = await self._nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(f"no subscriber listens on '{topic}' (subject '{subject}')") from exc
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise RequestTimeout(
                f"no reply on '{topic}' (subject '{subject}') within {timeout:g}s"
            ) from exc
        except nats.errors.Error as exc:
            raise _bus_error(f"cannot request on '{topic}'", exc) from exc
        return reply.data

    async def subscribe(self, topic: str, handler: Handler) -> Subscription:
        subject = self.subject(topic)

        async def deliver(msg: Msg) -> None:
            message = NatsMessage(self.topic(msg.subject), msg.data, msg.reply, self)
            try:
                await handler(message)
            except Exception:
                # one bad message must not end the subscription
                log.exception("handler for '%s' failed on %r", topic, message)

        try:
            sub = await self._nc.subscribe(
                subject,
                cb=deliver,
                pending_msgs_limit=_SUB_PENDING_MSGS,
                pending_bytes_limit=_SUB_PENDING_BYTES,
            )
        except nats.errors.Error as exc:
            raise _bus_error(f"cannot subscribe to '{topic}'", exc) from exc
        if self._nc.is_connected:
            # once the server confirms, a publish from another connection reaches this handler
            try:
                await self._barrier(self._confirm_timeout)
            except TimeoutError:
                # nats-py replays the subscription after a reconnect; it is not lost
                log.warning("NATS did not confirm the subscription to '%s' in time", topic)
        return NatsSubscription(sub, topic)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed every publish and subscription made so far.

        While disconnected this waits for the reconnect (within ``timeout``).
        """
        if self._closed:
            raise TransportError("cannot flush: the NATS bus is closed")
        try:
            await self._barrier(timeout)
        except TimeoutError as exc:
            state = "connected" if self.is_connected else "disconnected"
            raise TransportError(
                f"NATS did not confirm the publishes within {timeout:g}s ({state})"
            ) from exc

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._callbacks.append(callback)

    @property
    def is_connected(self) -> bool:
        return self._nc.is_connected

    @property
    def client(self) -> Client:
        """The underlying nats-py client, for what the ``MessageBus`` interface does not cover."""
        return self._nc

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("closed" if self._closed else "disconnected")
        return f"NatsBus({', '.join(self.servers)}, prefix={self.prefix!r}, {state})"


async def connect(settings: Any, url: str | None = None) -> NatsBus:
    """Open a bus to ``url`` (or ``nats_servers``, or the settings' controller address).

    ``settings`` is the root settings object (its ``nats_*`` keys are used, defaults where it
    has none) or a ``NatsSettings``. Raises ``TransportError`` when no server answers within
    ``nats_connect_timeout`` or the credentials are refused.
    """
    nats_settings = nats_settings_from(settings)
    fallback = getattr(settings, "controller_address", None)
    bus = NatsBus(server_urls(nats_settings, url, fallback), nats_settings.nats_subject_prefix)
    await bus._connect(nats_settings)
    return bus
