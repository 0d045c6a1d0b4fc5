"""Helpers of the peer-to-peer tests: a serving instance process, and a TCP proxy that can
corrupt a byte, or stall, between a fetching engine and its peer (real sockets on loopback)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

from lmcache_core.testing import free_port

from .support import REPO, InstanceProcess

sys.path.insert(0, str(REPO / "examples"))
from instance import kv_for  # noqa: E402  (the stand-in instance's deterministic KV)

SECRET = "peer-secret-for-tests"


def p2p_env(port: int, secret: str | None = SECRET, **extra: Any) -> dict[str, str]:
    env = {"LMCACHE_ENABLE_P2P": "true", "LMCACHE_P2P_HOST": "127.0.0.1", "LMCACHE_P2P_INIT_PORTS": str(port)}
    if secret is not None:
        env["LMCACHE_P2P_SECRET"] = secret
    env.update({f"LMCACHE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def serving_instance(nats_url: str, tmp: Path, instance_id: str, args: list[str], **extra: Any) -> tuple[InstanceProcess, str]:
    """``examples/instance.py`` with the peer channel on; returns it and its peer URL."""
    port = free_port()
    (tmp / instance_id).mkdir(parents=True, exist_ok=True)
    proc = InstanceProcess(
        nats_url, tmp / instance_id, instance_id=instance_id, args=["--log-level", "INFO", *args],
        disk=False, env=p2p_env(port, **extra),
    )
    return proc, f"127.0.0.1:{port}"


def p2p_settings(port: int | None = None, secret: str | None = SECRET) -> dict[str, Any]:
    """Settings of an in-process instance with the peer channel on."""
    settings: dict[str, Any] = {"enable_p2p": True, "p2p_host": "127.0.0.1", "p2p_init_ports": port or free_port()}
    if secret is not None:
        settings["p2p_secret"] = secret
    return settings


class Proxy:
    """Forwards one TCP connection at a time to ``target``; from byte ``corrupt_at`` of the
    server's answer it flips one byte, and after ``stall_after`` bytes it stops forwarding
    (``stalled`` is set) until ``cut()`` closes both sides."""

    def __init__(self, target: str, *, corrupt_at: int | None = None, stall_after: int | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.corrupt_at = corrupt_at
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self.forwarded = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self._listener.getsockname()[1]}"
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
