"""The peer channel's requesting side: fetch a run of chunks from a peer, or push chunks to one.

Both stream chunk by chunk: one chunk's bytes are in flight at a time (at most
``p2p_max_chunk_bytes``), each is checked against its checksum before it is handed on, and a
failure stops the transfer where it is. What was handed on before stays valid: every chunk is
whole and checked, so a peer that dies or lies costs a recompute of the rest, never a wrong token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from lmcache_core.keys import ChunkSpan
from lmcache_core.p2p.channel import CHUNK, END, FETCH, PUSH, STORED, Deadline, PeerError, Scratch, connect

log = logging.getLogger(__name__)

ChunkSink = Callable[[ChunkSpan, torch.Tensor], None]


@dataclass
class TransferResult:
    """What a fetch or push moved, and why it stopped early (``error``: None when it did not)."""

    peer: str
    chunks: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    spans: list[ChunkSpan] = field(default_factory=list)


def fetch_chunks(
    url: str,
    key: bytes | None,
    shard: list[object],
    spans: list[ChunkSpan],
    sink: ChunkSink,
    *,
    step_timeout: float,
    total_timeout: float | None,
    max_chunk_bytes: int,
) -> TransferResult:
    """Ask the peer at ``url`` for the chunks of ``spans`` (in order) and give each to ``sink``
    once checked; stops at the first chunk the peer lacks or anything that goes wrong (logged,
    in ``error``). The tensor given to ``sink`` is valid only during the call (one receive
    buffer serves every chunk: a transfer holds one chunk, however many it moves)."""
    result = TransferResult(peer=url)
    started = time.monotonic()
    conn = None
    try:
        conn = connect(url, key, Deadline(step_timeout, total_timeout))
        conn.send(FETCH, {"shard": shard, "hashes": [s.chunk_hash for s in spans]})
        scratch = Scratch()
        for span in spans:
            frame = conn.receive(CHUNK, END)
            if frame.kind == END:
                break
            if int(frame.header.get("hash", -1)) != span.chunk_hash or int(frame.header.get("tokens", -1)) != span.num_tokens:
                raise PeerError(f"{url} sent another chunk than the one asked for")
            tensor = conn.receive_chunk(frame, max_chunk_bytes, scratch)
            sink(span, tensor)
            result.chunks += 1
            result.tokens += span.num_tokens
            result.bytes += tensor.nbytes
            result.spans.append(span)
    except PeerError as exc:
        result.error = str(exc)
        log.warning("fetch from peer %s stopped after %d chunks: %s", url, result.chunks, exc)
    finally:
        if conn is not None:
            conn.close()
        result.seconds = time.monotonic() - started
    return result


def push_chunks(
    url: str,
    key: bytes | None,
    shard: list[object],
    chunks: Iterable[tuple[int, int, torch.Tensor]],
    *,
    location: str | None,
    step_timeout: float,
) -> TransferResult:
    """Send ``(chunk_hash, num_tokens, tensor)`` chunks to the peer at ``url``, which stores
    them (at ``location`` only when given); the result counts what the peer confirmed."""
    result = TransferResult(peer=url)
    started = time.monotonic()
    conn = None
    try:
        conn = connect(url, key, Deadline(step_timeout))
        conn.send(PUSH, {"shard": shard, "location": location})
        sent_bytes = 0
        for chunk_hash, num_tokens, tensor in chunks:
            conn.send_chunk(chunk_hash, num_tokens, tensor)
            sent_bytes += tensor.nbytes
        conn.send(END, {})
        stored = conn.receive(STORED).header
        result.chunks = int(stored.get("chunks", 0))
        result.tokens = int(stored.get("tokens", 0))
        result.bytes = sent_bytes
    except PeerError as exc:
        result.error = str(exc)
        log.warning("push to peer %s failed: %s", url, exc)
    finally:
        if conn is not None:
            conn.close()
        result.seconds = time.monotonic() - started
    return result
