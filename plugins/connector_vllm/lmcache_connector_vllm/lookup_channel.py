"""How vLLM's scheduler learns cache hits from the worker that holds the cache.

On CPU (and on GPU with more than one process) vLLM runs its scheduler in one process and each
worker in another. The cache engine, with its CPU tier, lives in the worker, so the scheduler
asks it through a Unix socket that the worker serves. The socket's path is derived from the
vLLM engine id (shared by the scheduler and the workers of one vLLM instance), the lmcache
instance id and the worker's rank, so two vLLM instances on one machine never cross.

When the scheduler and the worker share a process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the
client finds the worker's lookup function in a process-local registry and skips the socket.

Wire format (version 2), both directions little-endian:

* request: ``u32 count``, ``u16 id_length``, the request id (UTF-8; empty: a plain lookup),
  then ``count`` ``i64`` token ids;
* answer: ``i64 tokens`` (the longest stored prefix), or ``-1`` when the lookup failed.

A lookup with a request id also *holds* what it found for that request in the worker (see
``CacheEngine.hold``), until the load or a release named in the connector's step metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lmcache_core.errors import LMCacheError

log = logging.getLogger(__name__)

#: ``lookup(tokens, req_id)``; ``req_id`` is ``""`` for a lookup that holds nothing
LookupFn = Callable[[np.ndarray, str], int]

_HEADER = struct.Struct("<IH")
_ANSWER = struct.Struct("<q")
#: the longest token list one request may carry (guards the server against garbage lengths)
MAX_TOKENS = 1 << 24

# lookup functions served in this process, by socket path (the in-process shortcut)
_LOCAL: dict[str, LookupFn] = {}
_LOCAL_LOCK = threading.Lock()


class LookupChannelError(LMCacheError):
    """The scheduler could not ask a worker how many tokens are cached."""


def channel_path(engine_id: str, instance_id: str, rank: int) -> str:
    """The socket path for one worker of one vLLM instance (short enough for ``sun_path``)."""
    digest = hashlib.blake2b(f"{engine_id}\0{instance_id}".encode(), digest_size=8).hexdigest()
    return str(Path(tempfile.gettempdir()) / f"lmcache-{digest}-{rank}.sock")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("peer closed the lookup channel")
        got += n
    return bytes(buf)


class LookupServer:
    """Serves ``lookup(tokens) -> int`` on a Unix socket, one thread per connection.

    The server owns its threads: ``close()`` stops the listener, closes every connection and
    joins them. The scheduler holds one long-lived connection, so there are few threads.
    """

    def __init__(self, path: str, lookup: LookupFn) -> None:
        self.path = path
        self._lookup = lookup
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        try:
            os.unlink(path)  # a stale socket left by a crashed worker of the same instance
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            self._sock.listen(16)
        except OSError as exc:
            self._sock.close()
            raise LookupChannelError(f"cannot serve lookups on {path}: {exc}") from exc
        with _LOCAL_LOCK:
            _LOCAL[path] = lookup
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="lmcache-lookup-accept", daemon=True
        )
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the listening socket was closed
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="lmcache-lookup", daemon=True
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                count, id_length = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
                if count > MAX_TOKENS:
                    raise ConnectionError(f"lookup of {count} tokens exceeds {MAX_TOKENS}")
                req_id = _recv_exact(conn, id_length).decode("utf-8", "replace")
                tokens = np.frombuffer(_recv_exact(conn, count * 8), dtype="<i8")
                try:
                    found = int(self._lookup(tokens, req_id))
                except Exception:  # a failed lookup is a miss for the scheduler, not a crash
                    log.exception("lmcache lookup failed")
                    found = -1
                conn.sendall(_ANSWER.pack(found))
        except (ConnectionError, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop serving; in-flight requests finish or see their connection closed."""
        if self._closed.is_set():
            return
        self._closed.set()
        with _LOCAL_LOCK:
            if _LOCAL.get(self.path) is self._lookup:
                del _LOCAL[self.path]
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class LookupClient:
    """Asks one worker's ``LookupServer``; reconnects after errors, thread-safe.

    ``lookup`` raises ``LookupChannelError`` when the worker cannot be reached within
    ``timeout`` seconds; callers treat that as a miss.
    """

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        # after a failed connect, fail fast until then: the scheduler must not stall every step
        self._retry_at = 0.0

    def _connect(self) -> socket.socket:
        now = time.monotonic()
        if now < self._retry_at:
            raise LookupChannelError(f"no lmcache worker answers on {self.path} (retrying later)")
        deadline = now + self.timeout
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                return sock
            except OSError as exc:
                sock.close()
                # the worker may still be starting: retry with backoff until the deadline
                if time.monotonic() + delay > deadline:
                    self._retry_at = time.monotonic() + self.timeout
                    raise LookupChannelError(
                        f"no lmcache worker answers on {self.path}: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def lookup(self, tokens: Sequence[int] | np.ndarray, req_id: str = "") -> int:
        """Tokens in the longest stored prefix of ``tokens``, as the worker sees it.

        With ``req_id``, the worker holds those chunks for that request (see the module doc).
        """
        local = _LOCAL.get(self.path)
        arr = np.ascontiguousarray(np.asarray(tokens, dtype="<i8"))
        if local is not None:
            return int(local(arr, req_id))
        ident = req_id.encode("utf-8")
        if len(ident) > 0xFFFF:
            raise LookupChannelError(f"request id of {len(ident)} bytes is too long to send")
        payload = _HEADER.pack(len(arr), len(ident)) + ident + arr.tobytes()
        with self._lock:
            for attempt in (1, 2):  # one retry on a fresh connection (the worker restarted)
                if self._sock is None:
                    self._sock = self._connect()
                try:
                    self._sock.sendall(payload)
                    (found,) = _ANSWER.unpack(_recv_exact(self._sock, _ANSWER.size))
                    break
                except OSError as exc:
                    self._sock.close()
                    self._sock = None
                    if attempt == 2:
                        raise LookupChannelError(
                            f"lookup on {self.path} failed: {exc}"
                        ) from exc
        if found < 0:
            raise LookupChannelError(f"the worker on {self.path} failed to look up the tokens")
        return found

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
