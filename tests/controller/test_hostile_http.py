"""Hostile HTTP input against a real controller process with a live worker: every refusal is a
short 4xx that never repeats the input, nothing gets a 5xx, big bodies are refused before they
are read (the controller's memory stays far below their size), and the worker is never dropped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from lmcache_core.testing import running_nats_server

from .support import HEARTBEAT_TIMEOUT, PROMPT, Instance, read_json_line, stop_process, wait_for

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
BIG = 250 * MIB  # the body of the report: 250 MB
REQUEST_TIMEOUT = 2.0  # the controller's controller_request_timeout here; > the heartbeat timeout
ENDPOINTS = ["/lookup", "/clear", "/check_finish", "/health", "/query_worker_info"]
SHORT = 1024  # bytes: the most an error answer here may take


class LiveController:
    """``lmcache_controller`` as a real process, with one live in-process instance reporting to it."""

    def __init__(self, tmp: Path) -> None:
        self._nats = running_nats_server()
        server = self._nats.__enter__()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
        env.update(
            LMCACHE_CONTROLLER_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
            LMCACHE_CONTROLLER_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT),
        )
        self.stderr = (tmp / "controller.stderr").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
             "--nats-url", server.url, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
        )
        self.url = read_json_line(self.proc, "ready", "lmcache_controller")["http"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.process = psutil.Process(self.proc.pid)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.instance = Instance(server.url, "inst-a", tmp / "disk")
        self.instance.store(PROMPT)
        self.instance.sync()
        wait_for(lambda: self.client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"], what="credited")
        self.registered = self.workers()

    def workers(self) -> list[tuple[str, int, float]]:
        """The controller's own worker listing: (instance, rank, registration time)."""
        instances = self.client.get("/instances").json()["instances"]
        return [(w["instance_id"], w["worker_id"], w["registration_time"]) for i in instances for w in i["workers"]]

    def expired(self) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith("lmcache_controller_workers_expired_total "):
                return float(line.split()[1])
        raise AssertionError("no workers_expired metric")

    def rss_growth(self, action: Callable[[], Any]) -> tuple[Any, int]:
        """``action()``'s result and how far the controller's RSS rose above its start meanwhile."""
        start = self.process.memory_info().rss
        peak = start
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self.process.memory_info().rss)
                done.wait(0.002)  # the sampling period

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = action()
        finally:
            done.set()
            sampler.join()
        return result, peak - start

    def close(self) -> None:
        self.client.close()
        self.instance.close()
        stop_process(self.proc, 30)
        self.stderr.close()
        self._nats.__exit__(None, None, None)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveController]:
    controller = LiveController(tmp_path_factory.mktemp("hostile"))
    try:
        yield controller
    finally:
        controller.close()


@pytest.fixture(autouse=True)
def _worker_stays(live: LiveController) -> Iterator[None]:
    """After every test: the live worker is still listed, never re-registered, never expired."""
    yield
    assert live.workers() == live.registered
    assert live.expired() == 0


def assert_short_refusal(response: httpx.Response, status: int | None = None, *echoes: bytes) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
    if status is not None:
        assert response.status_code == status, response.content[:200]
    assert len(response.content) <= SHORT, len(response.content)
    for echo in echoes:
        assert echo not in response.content
    body = response.json()
    assert set(body) == {"detail"}
    return body


def _pieces(total: int, piece: bytes = b"\0" * MIB) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


def _raw_post(port: int, head: bytes, body: Iterator[bytes], *, pause: float = 0.0) -> httpx.Response:
    """POST over a raw socket: ``head`` (request line and headers), then ``body`` piece by piece
    (``pause`` seconds apart) while reading the answer; stops sending once the server answers."""
    sock = socket.create_connection(("127.0.0.1", port))
    answered = threading.Event()

    def write() -> None:
        try:
            sock.sendall(head)
            for piece in body:
                if answered.is_set():
                    return
                sock.sendall(piece)
                if pause:
                    answered.wait(pause)  # a slow client's pace
        except OSError:
            pass  # the server closed the connection after answering

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        sock.settimeout(60)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        answered.set()
    finally:
        writer.join(10)
        sock.close()
    head_text, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_text.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=content)


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(data) + 1


def _head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_250_mb_body_is_refused_from_its_content_length_before_it_is_read(live: LiveController) -> None:
    head = _head("/lookup", Content_Length=str(BIG))
    response, growth = live.rss_growth(lambda: _raw_post(live.port, head, _pieces(BIG)))
    detail = assert_short_refusal(response, 413, b"\0")["detail"]
    assert detail == f"request body too large ({BIG} bytes): /lookup accepts at most {16 * MIB} bytes (controller_max_request_bytes)"
    assert response.headers["connection"] == "close"
    assert growth < 32 * MIB, growth  # the body was never read


def test_a_250_mb_chunked_body_is_refused_once_it_passes_the_limit(live: LiveController) -> None:
    def post() -> httpx.Response:
        return live.client.post("/lookup", content=_pieces(BIG), headers={"content-type": "application/json"})

    response, growth = live.rss_growth(post)
    detail = assert_short_refusal(response, 413, b"\0")["detail"]
    assert detail == f"request body too large: /lookup accepts at most {16 * MIB} bytes (controller_max_request_bytes)"
    assert growth < 64 * MIB, growth  # at most the 16 MiB limit was read, never the 250 MB


def test_other_endpoints_refuse_bodies_over_64_kib(live: LiveController) -> None:
    for path in ENDPOINTS[1:]:
        response = live.client.post(path, content=b'{"instance_id": "' + b"a" * 70_000 + b'"}')
        assert_short_refusal(response, 413, b"aaaa")


def test_a_10_mb_body_of_nuls_gets_a_short_answer_without_them(live: LiveController) -> None:
    nuls = b"\0" * (10 * MIB)
    for path in ENDPOINTS:
        response, growth = live.rss_growth(lambda: live.client.post(path, content=nuls))
        assert_short_refusal(response, 422 if path == "/lookup" else 413, b"\0", b"\\u0000")
        assert growth < 64 * MIB, (path, growth)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"tokens": [1, NaN]}',
        b'{"tokens": [Infinity]}',
        b'{"instance_id": NaN, "location": "x", "event_id": -Infinity}',
        b'{"instance_id": "\xff\xfe", "location": "\xc3", "event_id": "\xff", "tokens": [1]}',
        b"\xff\xfe\xfd" * 1000,
        b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["nan", "infinity", "nan-and-minus-infinity", "non-utf8-strings", "non-utf8-body", "deep-nesting"],
)
def test_bodies_that_are_not_json_get_a_short_4xx_on_every_endpoint(live: LiveController, raw: bytes) -> None:
    for path in ENDPOINTS:
        response = live.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert_short_refusal(response, None, b"NaN", b"Infinity", b"\xff", b"[[[[")


@pytest.mark.parametrize("token", ['"1"', "1.0", "true", "false", "-1", "4294967296", "1e3", "null"])
def test_token_ids_that_are_not_integers_in_range_are_refused(live: LiveController, token: str) -> None:
    raw = f'{{"tokens": [{", ".join(map(str, PROMPT))}, {token}]}}'.encode()
    response = live.client.post("/lookup", content=raw, headers={"content-type": "application/json"})
    detail = assert_short_refusal(response, 422)["detail"]
    assert detail[0]["loc"] == ["body", "tokens", len(PROMPT)]


def test_wrong_types_on_the_other_endpoints_get_a_short_422(live: LiveController) -> None:
    huge = "x" * 60_000
    for path, body in [
        ("/clear", {"instance_id": 1, "location": [huge]}),
        ("/check_finish", {"event_id": huge}),
        ("/health", {"instance_id": {"a": huge}}),
        ("/query_worker_info", {"instance_id": "inst-a", "worker_ids": [-1, "1", 1.5, True]}),
        ("/query_worker_info", {"instance_id": "inst-a", huge: 1}),
    ]:
        assert_short_refusal(live.client.post(path, json=body), 422, huge[:100].encode())


def test_a_body_slower_than_the_request_timeout_gets_a_408_while_the_worker_stays(live: LiveController) -> None:
    head = _head("/lookup", Content_Length="1000")
    started = time.monotonic()
    # one byte every 50 ms: never idle, but 1,000 bytes would take 50 s
    response = _raw_post(live.port, head, iter([b" "] * 1000), pause=0.05)
    assert_short_refusal(response, 408)
    assert response.json() == {"detail": f"the request body did not arrive within {REQUEST_TIMEOUT:g} s (controller_request_timeout)"}
    assert REQUEST_TIMEOUT <= time.monotonic() - started < REQUEST_TIMEOUT + 10
    # held open longer than the heartbeat timeout, and the worker is still there (fixture)
    assert time.monotonic() - started > HEARTBEAT_TIMEOUT


def _closed_after(port: int, head: bytes = b"", trickle: Iterator[bytes] = iter(())) -> float:
    """Seconds from connecting to ``port`` until the server closes the connection, sending
    ``head`` at once and then ``trickle`` one piece every 50 ms."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    sock.settimeout(0.05)
    try:
        while True:
            try:
                if not sock.recv(65536):
                    return time.monotonic() - started
            except socket.timeout:
                sock.sendall(next(trickle, b""))  # a slow client's pace: the recv timeout
    finally:
        sock.close()


def test_a_connection_that_sends_nothing_or_its_head_too_slowly_is_closed(live: LiveController) -> None:
    assert REQUEST_TIMEOUT <= _closed_after(live.port) < REQUEST_TIMEOUT + 10
    head = b"POST /lookup HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    assert REQUEST_TIMEOUT <= _closed_after(live.port, head, iter([b"a"] * 10_000)) < REQUEST_TIMEOUT + 10


def test_a_request_head_over_64_kib_is_refused(live: LiveController) -> None:
    response = live.client.get("/instances", headers={"x-big": "a" * 70_000})
    assert response.status_code == 400 and len(response.content) <= SHORT and b"aaaa" not in response.content


def test_a_million_token_lookup_is_answered_while_heartbeats_go_on(live: LiveController) -> None:
    tokens = PROMPT + list(range(100_000, 100_000 + 1_048_576 - len(PROMPT)))
    body = json.dumps({"tokens": tokens}).encode()
    assert len(body) > 8 * MIB
    for _ in range(3):
        response = live.client.post("/lookup", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200
        assert response.json()["layout_info"] == {"inst-a": ["LocalCPUBackend", len(PROMPT)]}
