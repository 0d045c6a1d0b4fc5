"""The peer channel's wire format: framed messages over one TCP stream, and its handshake.

A frame is ``MAGIC`` (4 bytes), a kind (1 byte), the length of a JSON header (4 bytes, big
endian), the header, and for ``CHUNK`` frames the chunk's raw bytes (``nbytes`` in the header)
followed by their xxh3-64 (8 bytes, big endian; each side hashes piece by piece as the bytes
pass, so checking costs no second pass over memory). Bulk bytes go straight between a tensor's memory and the socket
(``sendall`` of a memoryview, ``recv_into`` a preallocated tensor): no copy in Python.

Handshake (both sides prove they know the key, neither reveals it)::

    server -> HELLO   {"version": 1, "nonce": server nonce}
    client -> AUTH    {"nonce": client nonce, "mac": HMAC(key, "client" + sn + cn)}
    server -> WELCOME {"mac": HMAC(key, "server" + cn + sn)}     or REFUSED {"detail"}

The key is derived from ``p2p_secret`` (or the bus's ``nats_token``) by ``channel_key``.
Blocking sockets with a timeout on every step (``Deadline``): both the server's threads and the
engine's fetch run them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from lmcache_core.errors import LMCacheError

MAGIC = b"LMP1"
CHANNEL_VERSION = 1
_HEAD = struct.Struct("!4sBI")
_SUM = struct.Struct("!Q")  # a chunk's xxh3-64, after its bytes
_PIECE = 1 << 20  # most bytes received (then hashed, still in the cache) at a time (the deadline is rechecked between receives)
_SEND_PIECE = 512 << 10  # bytes hashed then sent at a time: they stay in the cache between the two
MAX_HEADER = 1 << 20  # a fetch of a 1M-token prompt lists ~4k hashes: far below

HELLO, AUTH, WELCOME, REFUSED, FETCH, CHUNK, END, PUSH, STORED, ERROR = range(1, 11)
KIND_NAMES = {
    HELLO: "HELLO", AUTH: "AUTH", WELCOME: "WELCOME", REFUSED: "REFUSED", FETCH: "FETCH",
    CHUNK: "CHUNK", END: "END", PUSH: "PUSH", STORED: "STORED", ERROR: "ERROR",
}

#: dtypes a chunk may have on the wire (never ``getattr(torch, <peer's text>)``)
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2,
    )
}


class PeerError(LMCacheError):
    """A transfer with a peer failed (unreachable, timed out, closed, or spoke nonsense)."""


class PeerAuthError(PeerError):
    """The peer does not know the channel's key (or we do not know its)."""


class ChunkCorruptError(PeerError):
    """A chunk's bytes do not match the checksum its peer sent: it is not stored."""


def channel_key(settings: Any) -> bytes | None:
    """The channel's HMAC key: from ``p2p_secret``, else the bus's ``nats_token``; None: neither
    is set (no authentication: allowed on loopback only, see ``PeerServer``)."""
    for name in ("p2p_secret", "nats_token"):
        secret = getattr(settings, name, None)
        if secret is not None:
            value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
            if value:
                # a key of its own: the channel never sends anything the bus secret opens
                return hmac.new(value.encode(), b"lmcache-p2p-channel/v1", hashlib.sha256).digest()
    return None


def _mac(key: bytes | None, role: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(key or b"", role + first + second, hashlib.sha256).hexdigest()


class Deadline:
    """A transfer's time budget: every socket step gets ``min(step, what is left)``.

    The socket stays in blocking mode and the kernel keeps the time (``SO_RCVTIMEO`` /
    ``SO_SNDTIMEO``): Python's own socket timeout would poll before every ``recv``, which costs
    a third of the throughput on loopback.
    """

    def __init__(self, step: float, total: float | None = None) -> None:
        self.step = step
        self.end = None if total is None else time.monotonic() + total
        self._armed: float | None = None

    def arm(self, sock: socket.socket) -> None:
        timeout = self.step
        if self.end is not None:
            left = self.end - time.monotonic()
            if left <= 0:
                raise PeerError("the transfer ran out of time")
            timeout = min(timeout, left)
        if self._armed is not None and abs(self._armed - timeout) < 0.05 * timeout:
            return  # close enough: skip two syscalls per step
        self._armed = timeout
        seconds = int(timeout)
        micros = max(int((timeout - seconds) * 1e6), 0 if seconds else 1)  # 0 would mean never
        value = struct.pack("ll", seconds, micros)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class Scratch:
    """One receive buffer reused chunk after chunk (grown to the largest chunk seen)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # let the old one go first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


@dataclass
class Frame:
    kind: int
    header: dict[str, Any]


class Connection:
    """One end of a peer channel: frames in and out over a connected blocking socket."""

    def __init__(self, sock: socket.socket, deadline: Deadline, peer: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.peer = peer
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- frames ------------------------------------------------------------------------------
    def send(self, kind: int, header: dict[str, Any], payload: memoryview | None = None) -> None:
        body = json.dumps(header, separators=(",", ":")).encode()
        try:
            self.deadline.arm(self.sock)
            self.sock.sendall(_HEAD.pack(MAGIC, kind, len(body)) + body)
            if payload is not None:
                self._send_payload(payload)
        except OSError as exc:
            raise PeerError(f"sending to {self.peer} failed: {_why(exc)}") from exc

    def _send_payload(self, payload: memoryview) -> None:
        """The bytes, then their xxh3-64 (8 bytes): each piece is hashed just before it is
        sent, so the kernel copies it out of the cache the hash just loaded it into."""
        digest = xxhash.xxh3_64()
        for offset in range(0, len(payload), _SEND_PIECE):
            piece = payload[offset : offset + _SEND_PIECE]
            digest.update(piece)
            self.deadline.arm(self.sock)
            self.sock.sendall(piece)
        self.deadline.arm(self.sock)
        self.sock.sendall(_SUM.pack(digest.intdigest()))

    def receive(self, *expected: int) -> Frame:
        """The next frame; ``PeerError`` when it is not one of ``expected`` (an ERROR's detail)."""
        head = bytearray(_HEAD.size)
        self.read_into(memoryview(head))
        magic, kind, length = _HEAD.unpack(head)
        if magic != MAGIC:
            raise PeerError(f"{self.peer} does not speak the lmcache peer channel")
        if length > MAX_HEADER:
            raise PeerError(f"{self.peer} sent a {length}-byte header (at most {MAX_HEADER})")
        body = bytearray(length)
        self.read_into(memoryview(body))
        try:
            header = json.loads(body)
        except ValueError as exc:
            raise PeerError(f"{self.peer} sent an unreadable header") from exc
        if not isinstance(header, dict):
            raise PeerError(f"{self.peer} sent an unreadable header")
        if kind not in expected:
            if kind in (ERROR, REFUSED):
                raise (PeerAuthError if kind == REFUSED else PeerError)(
                    f"{self.peer}: {header.get('detail', 'refused')}"
                )
            raise PeerError(
                f"{self.peer} sent {KIND_NAMES.get(kind, kind)}, expected "
                + " or ".join(KIND_NAMES[k] for k in expected)
            )
        return Frame(kind, header)

    def read_into(self, view: memoryview, digest: Any = None) -> None:
        """Fill ``view`` from the socket (hashing into ``digest`` as it arrives); ``PeerError``
        when the peer closes or is too slow."""
        got = 0
        total = len(view)
        try:
            while got < total:
                self.deadline.arm(self.sock)
                n = self.sock.recv_into(view[got:], min(total - got, _PIECE))
                if n == 0:
                    raise PeerError(f"{self.peer} closed the connection mid-transfer")
                if digest is not None:
                    digest.update(view[got : got + n])
                got += n
        except OSError as exc:
            raise PeerError(f"receiving from {self.peer} failed: {_why(exc)}") from exc

    # --- chunks ------------------------------------------------------------------------------
    def send_chunk(self, chunk_hash: int, num_tokens: int, tensor: torch.Tensor) -> None:
        """A CHUNK frame with ``tensor``'s bytes and their checksum (no copy when contiguous)."""
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        data = memoryview(flat.numpy())
        self.send(
            CHUNK,
            {
                "hash": int(chunk_hash),
                "tokens": int(num_tokens),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "nbytes": len(data),
            },
            data,
        )

    def receive_chunk(self, frame: Frame, max_bytes: int, scratch: "Scratch | None" = None) -> torch.Tensor:
        """The tensor a CHUNK frame announces, read and checked against its checksum.

        A chunk larger than ``max_bytes`` is refused before any memory is taken for it;
        ``ChunkCorruptError`` when the bytes do not match (the connection is then unusable).
        With ``scratch`` the bytes land in its reused buffer: the tensor is valid until the
        next chunk (what a caller that copies it anyway, like the engine's tiers, wants).
        """
        header = frame.header
        try:
            dtype = DTYPES[header["dtype"]]
            shape = [int(d) for d in header["shape"]]
            nbytes = int(header["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerError(f"{self.peer} sent a chunk header without a valid {exc}") from exc
        if nbytes > max_bytes:
            raise PeerError(
                f"{self.peer} sent a {nbytes}-byte chunk; p2p_max_chunk_bytes allows {max_bytes}"
            )
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != nbytes or min(shape, default=1) < 0:
            raise PeerError(f"{self.peer} sent a chunk whose shape {shape} does not fit {nbytes} bytes")
        raw = scratch.take(nbytes) if scratch is not None else torch.empty(nbytes, dtype=torch.uint8)
        data = memoryview(raw.numpy())
        digest = xxhash.xxh3_64()
        self.read_into(data, digest)
        trailer = bytearray(_SUM.size)
        self.read_into(memoryview(trailer))
        if digest.intdigest() != _SUM.unpack(trailer)[0]:
            raise ChunkCorruptError(
                f"chunk {header.get('hash')} from {self.peer} does not match its checksum; not stored"
            )
        return raw.view(dtype).reshape(shape)

    # --- handshake ---------------------------------------------------------------------------
    def server_handshake(self, key: bytes | None) -> bool:
        """Challenge the client; False (after telling it) when it does not know the key."""
        server_nonce = os.urandom(32)
        self.send(HELLO, {"version": CHANNEL_VERSION, "nonce": server_nonce.hex()})
        auth = self.receive(AUTH).header
        try:
            client_nonce = bytes.fromhex(str(auth["nonce"]))
            mac = str(auth["mac"])
        except (KeyError, ValueError):
            client_nonce, mac = b"", ""
        expected = _mac(key, b"client", server_nonce, client_nonce)
        if len(client_nonce) != 32 or not hmac.compare_digest(mac, expected):
            self.send(REFUSED, {"detail": "wrong credentials for the peer channel (p2p_secret)"})
            return False
        self.send(WELCOME, {"mac": _mac(key, b"server", client_nonce, server_nonce)})
        return True

    def client_handshake(self, key: bytes | None) -> None:
        """Answer the server's challenge and check its proof; ``PeerAuthError`` on a mismatch."""
        hello = self.receive(HELLO).header
        if hello.get("version") != CHANNEL_VERSION:
            raise PeerError(
                f"{self.peer} speaks peer channel version {hello.get('version')}; this instance "
                f"speaks {CHANNEL_VERSION}"
            )
        try:
            server_nonce = bytes.fromhex(str(hello["nonce"]))
        except (KeyError, ValueError) as exc:
            raise PeerError(f"{self.peer} sent a malformed HELLO") from exc
        client_nonce = os.urandom(32)
        self.send(AUTH, {"nonce": client_nonce.hex(), "mac": _mac(key, b"client", server_nonce, client_nonce)})
        welcome = self.receive(WELCOME).header
        if not hmac.compare_digest(str(welcome.get("mac", "")), _mac(key, b"server", client_nonce, server_nonce)):
            raise PeerAuthError(f"{self.peer} does not know the peer channel's key")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _why(exc: OSError) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError, BlockingIOError)):  # SO_*TIMEO: EAGAIN
        return "timed out"
    return exc.strerror or type(exc).__name__


def parse_peer_url(url: str) -> tuple[str, int]:
    """``host:port`` (optionally ``tcp://``) -> ``(host, port)``; ``PeerError`` naming the URL."""
    text = url.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerError(f"peer URL {url!r} is not host:port")
    return host.strip("[]"), int(port)


def connect(url: str, key: bytes | None, deadline: Deadline) -> Connection:
    """An authenticated connection to the peer at ``url``."""
    host, port = parse_peer_url(url)
    timeout = deadline.step
    if deadline.end is not None:
        timeout = max(0.001, min(timeout, deadline.end - time.monotonic()))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerError(f"cannot reach peer {url}: {_why(exc)}") from exc
    conn = Connection(sock, deadline, url)
    try:
        conn.client_handshake(key)
    except BaseException:
        conn.close()
        raise
    return conn
