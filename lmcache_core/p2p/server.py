"""``PeerServer``: serves an engine's chunks to peers, and takes the chunks peers push to it.

It binds when built (a port in use is an error at start, naming the setting) and serves from
``serve()``, a coroutine its owner (the worker) runs in its task group: each connection is
handled by a blocking function in a worker thread of that group, at most ``max_connections``
at once, so at most that many chunks are in flight. ``close()`` (or cancelling ``serve``)
closes the listening socket and every open connection, which ends their threads.

Requests after the handshake (``channel``):

* ``FETCH {"shard": [...], "hashes": [...]}``: the chunks of those hashes, in order, up to the
  first one this engine does not hold; then ``END {"chunks": n}``;
* ``PUSH {"shard": [...], "location": name or null}``, then ``CHUNK`` frames and ``END``: each
  chunk checked and stored (at ``location`` only, or in every tier); then
  ``STORED {"chunks": n, "tokens": t}``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.keys import ChunkSpan
from lmcache_core.p2p.channel import (
    CHUNK,
    END,
    ERROR,
    FETCH,
    PUSH,
    STORED,
    ChunkCorruptError,
    Connection,
    Deadline,
    PeerError,
    channel_key,
)

if TYPE_CHECKING:
    from lmcache_core.engine import CacheEngine

log = logging.getLogger(__name__)


def peer_port(settings: Any, rank: int) -> int | None:
    """Rank ``rank``'s port from ``p2p_init_ports`` (a list: one per rank); None when unset."""
    ports = settings.p2p_init_ports
    if ports is None:
        return None
    if isinstance(ports, int):
        ports = [ports]
    if rank >= len(ports):
        raise ConfigError(
            f"p2p_init_ports lists {len(ports)} port(s) but this is rank {rank}: give one port per rank"
        )
    return int(ports[rank])


def peer_url(host: str, port: int) -> str:
    """``host:port`` as peers connect to it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def shard_of(engine: "CacheEngine") -> list[Any]:
    """What a peer must name for a chunk of this engine to be the one it means."""
    meta = engine.metadata
    return [meta.model_name, meta.world_size, meta.worker_id, meta.kv_dtype,
            engine.hasher.chunk_size, engine.hasher.namespace]


@dataclass
class ServerCounters:
    """What a ``PeerServer`` did, for logs and tests."""

    served_chunks: int = 0
    served_bytes: int = 0
    refused_peers: int = 0
    stored_chunks: int = 0


class PeerServer:
    """The peer channel's listening side for one engine (one rank)."""

    def __init__(self, engine: "CacheEngine", host: str, port: int, *, max_connections: int = 4) -> None:
        settings = engine.settings
        self.engine = engine
        self.key = channel_key(settings)
        if self.key is None and not _is_loopback(host):
            raise ConfigError(
                f"refusing to serve the peer channel on {host!r} (not loopback) without "
                "authentication: set p2p_secret (or the bus's nats_token)"
            )
        if self.key is None:
            log.warning("the peer channel on %s:%d runs without authentication (loopback only)", host, port)
        self.timeout = settings.p2p_timeout
        self.max_bytes = settings.p2p_max_chunk_bytes
        try:
            self._listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for peers on {host}:{port} (p2p_host, p2p_init_ports): {exc.strerror}"
            ) from None
        self._listener.setblocking(False)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._limiter = anyio.CapacityLimiter(max_connections)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.counters = ServerCounters()

    @property
    def url(self) -> str:
        """The bound address as a peer URL (``PeerAgent.url`` says what is advertised)."""
        return peer_url(self.host, self.port)

    async def serve(self) -> None:
        """Accept peers until cancelled or closed; each is served in a worker thread."""
        try:
            async with anyio.create_task_group() as tg:
                while not self._closed:
                    await anyio.wait_readable(self._listener)
                    try:
                        sock, addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        if self._closed:
                            return
                        raise
                    sock.setblocking(True)
                    with self._lock:
                        self._open.add(sock)
                    tg.start_soon(self._serve_one, sock, f"{addr[0]}:{addr[1]}")
        finally:
            self.close()

    async def _serve_one(self, sock: socket.socket, peer: str) -> None:
        try:
            await anyio.to_thread.run_sync(
                self._serve_connection, sock, peer, limiter=self._limiter, abandon_on_cancel=True
            )
        finally:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and cut every open connection (idempotent)."""
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # --- one connection (a worker thread) ------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        conn = Connection(sock, Deadline(self.timeout), peer)
        try:
            if not conn.server_handshake(self.key):
                self.counters.refused_peers += 1
                log.warning("refused peer %s: wrong credentials for the peer channel", peer)
                return
            while True:
                try:
                    frame = conn.receive(FETCH, PUSH)
                except PeerError:
                    return  # the peer is done (or gone): nothing to answer
                if list(frame.header.get("shard", [])) != shard_of(self.engine):
                    conn.send(ERROR, {"detail": f"this peer caches another model shard: {shard_of(self.engine)}"})
                    return
                if frame.kind == FETCH:
                    self._send_chunks(conn, frame.header.get("hashes", []))
                else:
                    self._take_chunks(conn, frame.header.get("location"))
        except PeerError as exc:
            log.info("peer %s: %s", peer, exc)
        except Exception:  # a peer must never take the worker down
            log.exception("serving peer %s failed", peer)

    def _send_chunks(self, conn: Connection, hashes: list[Any]) -> None:
        sent = nbytes = 0
        for chunk_hash in hashes:
            view = self.engine.view_chunk(int(chunk_hash))
            if view is None:
                break
            try:
                conn.send_chunk(int(chunk_hash), view.num_tokens, view.tensor)
                nbytes += view.tensor.nbytes
            finally:
                view.release()
            sent += 1
        conn.send(END, {"chunks": sent})
        self.counters.served_chunks += sent
        self.counters.served_bytes += nbytes
        log.info("served %d of %d chunks (%d bytes) to peer %s", sent, len(hashes), nbytes, conn.peer)

    def _take_chunks(self, conn: Connection, location: str | None) -> None:
        stored = tokens = 0
        while True:
            frame = conn.receive(CHUNK, END)
            if frame.kind == END:
                break
            try:
                tensor = conn.receive_chunk(frame, self.max_bytes)
            except ChunkCorruptError as exc:
                log.warning("%s", exc)
                conn.send(ERROR, {"detail": str(exc)})
                raise
            num_tokens = int(frame.header["tokens"])
            try:
                self.engine.store_received(int(frame.header["hash"]), num_tokens, tensor, location)
            except LMCacheError as exc:
                conn.send(ERROR, {"detail": str(exc)})
                raise PeerError(str(exc)) from exc
            stored += 1
            tokens += num_tokens
            self.counters.stored_chunks += 1
        conn.send(STORED, {"chunks": stored, "tokens": tokens})


def span_of(chunk_hash: int, num_tokens: int) -> ChunkSpan:
    """A span for storing a chunk received whole (its position in a prompt is not needed)."""
    return ChunkSpan(chunk_hash, 0, num_tokens)
