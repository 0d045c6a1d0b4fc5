"""A worker's peer-to-peer side: its ``PeerServer``, fetches on a local miss, and pushes.

``PeerAgent`` belongs to a ``WorkerHandle`` with ``enable_p2p``: the worker runs the server in
its task group, advertises ``url`` in its registration (``peer_init_url``), answers ``push``
commands with ``push`` and lets its engine fetch through ``fetch_prefix``
(``CacheEngine.fetch_from_peers``), which asks the controller over the bus which peer of the
same rank holds the longest prefix (``peer_lookup``) and takes the missing chunks from it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import ValidationError

from lmcache_core.errors import ConfigError, LMCacheError, UnknownLocationError
from lmcache_core.keys import TokenSequence
from lmcache_core.p2p.channel import channel_key
from lmcache_core.p2p.client import TransferResult, fetch_chunks, push_chunks
from lmcache_core.p2p.server import PeerServer, peer_port, peer_url, shard_of
from lmcache_core.wire import PeerLookupReply, PeerLookupRequest, PushCommand, peer_lookup_topic
from lmcache_core.worker_address import route_source_ip

if TYPE_CHECKING:
    from lmcache_core.worker import WorkerHandle

log = logging.getLogger(__name__)

#: bind addresses that mean "every interface": not an address a peer can connect to
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


class PeerAgent:
    """P2P for one worker: binds the peer channel at ``p2p_host:p2p_init_ports[rank]``."""

    def __init__(self, worker: "WorkerHandle") -> None:
        self.worker = worker
        engine = self.engine = worker.engine
        settings = self.settings = engine.settings
        port = peer_port(settings, worker.identity.worker_id)
        if port is None or settings.p2p_host is None:
            raise ConfigError("enable_p2p needs p2p_host and p2p_init_ports (one port per rank)")
        if not settings.enable_controller and not settings.controller_address:
            raise ConfigError("enable_p2p needs the controller (enable_controller, controller_url)")
        self.server = PeerServer(engine, settings.p2p_host, port)
        self.key = channel_key(settings)
        self._lock = threading.Lock()
        #: what fetches brought in, for logs and metrics: per peer URL, bytes and tokens
        self.fetched_bytes: dict[str, int] = {}
        self.fetched_tokens: dict[str, int] = {}
        self.last_fetch: TransferResult | None = None

    @property
    def url(self) -> str:
        """Where peers reach this rank (``peer_init_url``): ``p2p_advertise_host`` when set, the
        address of the route to the bus for a wildcard ``p2p_host``, else the bound address."""
        host = self.settings.p2p_advertise_host
        if not host and self.server.host in _WILDCARDS:
            host = route_source_ip(self.settings.controller_address) or None
        return peer_url(host or self.server.host, self.server.port)

    def close(self) -> None:
        self.server.close()

    # --- fetching on a local miss --------------------------------------------------------------
    def fetch_prefix(self, tokens: TokenSequence) -> TransferResult | None:
        """Fetch what a peer holds beyond the local prefix of ``tokens``; what moved (None: no
        peer holds more than this engine).

        Never raises for a peer's or the bus's failure: it logs and returns what it stored
        (whole, checked chunks only; ``error`` says why it stopped), and the caller computes
        the rest.
        """
        engine = self.engine
        spans = engine.hasher.spans(tokens)
        if not spans:
            return None
        found = engine.lookup(tokens)
        local = sum(1 for span in spans if span.end <= found)
        if local == len(spans):
            return None
        hashes = np.fromiter((s.chunk_hash for s in spans), dtype="<u8", count=len(spans))
        try:
            reply = self._locate(hashes, spans[-1].end)
        except (LMCacheError, ValidationError) as exc:
            log.info("peer lookup failed (computing instead): %s", exc)
            return None
        if not reply.found or reply.chunks <= local or not reply.peer_init_url:
            return None
        wanted = spans[local : reply.chunks]
        result = fetch_chunks(
            reply.peer_init_url,
            self.key,
            shard_of(engine),
            wanted,
            lambda span, tensor: engine.store_received(span.chunk_hash, span.num_tokens, tensor),
            step_timeout=self.settings.p2p_timeout,
            total_timeout=self.settings.p2p_fetch_timeout,
            max_chunk_bytes=self.settings.p2p_max_chunk_bytes,
        )
        peer = result.peer = f"{reply.instance_id}/{reply.worker_id} at {reply.peer_init_url}"
        with self._lock:
            self.fetched_bytes[peer] = self.fetched_bytes.get(peer, 0) + result.bytes
            self.fetched_tokens[peer] = self.fetched_tokens.get(peer, 0) + result.tokens
            self.last_fetch = result
        if result.chunks:
            log.info(
                "fetched %d tokens (%d chunks, %d bytes) from peer %s in %.3f s%s",
                result.tokens, result.chunks, result.bytes, peer, result.seconds,
                f"; stopped early: {result.error}" if result.error else "",
            )
        return result

    def _locate(self, hashes: np.ndarray, num_tokens: int) -> PeerLookupReply:
        """Ask the controller (on the worker's event loop) which peer holds the longest prefix."""
        worker = self.worker
        portal = worker._portal
        if portal is None:
            raise LMCacheError("the worker is not running")
        ident = worker.identity
        request = PeerLookupRequest(
            instance_id=ident.instance_id, worker_id=ident.worker_id, epoch=ident.epoch,
            hashes=hashes.tobytes(), num_tokens=num_tokens,
        )
        topic = peer_lookup_topic(ident.instance_id, ident.worker_id)
        timeout = self.settings.p2p_fetch_timeout

        async def ask() -> bytes:
            bus = worker._bus
            if bus is None:
                raise LMCacheError("not connected to the bus")
            return await bus.request(topic, request.encode(), timeout)

        return PeerLookupReply.decode(portal.call(ask))

    # --- pushing (the controller's moves between instances) ----------------------------------
    def push(self, command: PushCommand) -> TransferResult:
        """Send the stored prefix of ``command.tokens`` to its peer; drop it here unless ``copy``."""
        engine = self.engine
        if command.location is not None and command.location not in engine.backends:
            raise UnknownLocationError(command.location, engine.locations)
        spans = engine.hasher.spans(command.tokens)
        sent: list[int] = []

        def chunks() -> Iterator[tuple[int, int, torch.Tensor]]:
            for span in spans:
                view = self._view_at(span.chunk_hash, command.location)
                if view is None:
                    return
                try:
                    yield span.chunk_hash, view.num_tokens, view.tensor
                finally:
                    view.release()
                sent.append(span.chunk_hash)

        result = push_chunks(
            command.peer_init_url, self.key, shard_of(engine), chunks(),
            location=command.target_location, step_timeout=self.settings.p2p_timeout,
        )
        if result.error is None and not command.should_copy:
            confirmed = sent[: result.chunks]
            for chunk_hash in confirmed:
                key = engine.keys.key(chunk_hash)
                targets = [engine.backend(command.location)] if command.location else list(engine.backends.values())
                for backend in targets:
                    backend.remove(key)
        log.info(
            "pushed %d tokens (%d chunks, %d bytes) to peer %s in %.3f s%s",
            result.tokens, result.chunks, result.bytes, command.peer_init_url, result.seconds,
            "" if command.should_copy else " and dropped them here",
        )
        return result

    def _view_at(self, chunk_hash: int, location: str | None):  # -> ChunkView | None
        if location is None:
            return self.engine.view_chunk(chunk_hash)
        return self.engine.backend(location).get(self.engine.keys.key(chunk_hash))
