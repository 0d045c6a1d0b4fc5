"""The scheduler-to-worker lookup channel over a real Unix socket."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lmcache_connector_vllm.lookup_channel import (
    LookupChannelError,
    LookupClient,
    LookupServer,
    channel_path,
)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "lookup.sock")


def prefix_of(stored: list[int]):
    """A lookup that answers how long a prefix of ``stored`` the tokens are."""

    def lookup(tokens: np.ndarray, req_id: str) -> int:
        n = 0
        for a, b in zip(tokens.tolist(), stored):
            if a != b:
                break
            n += 1
        return n

    return lookup


def test_client_gets_the_workers_answer_over_the_socket(sock_path: str) -> None:
    server = LookupServer(sock_path, prefix_of(list(range(100))))
    client = LookupClient(sock_path, timeout=5)
    try:
        # the in-process shortcut would bypass the socket: take it out to test the wire
        from lmcache_connector_vllm import lookup_channel

        lookup_channel._LOCAL.pop(sock_path)
        assert client.lookup(list(range(50)) + [-1, 7]) == 50
        assert client.lookup(np.arange(100)) == 100
        assert client.lookup([]) == 0
        assert client.lookup([2**62, -(2**62)]) == 0  # full int64 range travels intact
    finally:
        client.close()
        server.close()
    assert not os.path.exists(sock_path)


def test_the_request_id_travels_with_the_tokens(sock_path: str) -> None:
    seen: list[tuple[str, list[int]]] = []

    def lookup(tokens: np.ndarray, req_id: str) -> int:
        seen.append((req_id, tokens.tolist()))
        return len(tokens)

    server = LookupServer(sock_path, lookup)
    from lmcache_connector_vllm import lookup_channel

    lookup_channel._LOCAL.pop(sock_path)
    client = LookupClient(sock_path, timeout=5)
    try:
        assert client.lookup([4, 5, 6], "cmpl-é-1") == 3
        assert client.lookup([7]) == 1
        assert seen == [("cmpl-é-1", [4, 5, 6]), ("", [7])]
        with pytest.raises(LookupChannelError, match="too long"):
            client.lookup([1], "x" * 70000)
    finally:
        client.close()
        server.close()
    assert not os.path.exists(sock_path)


def test_client_in_the_workers_process_skips_the_socket(sock_path: str) -> None:
    calls: list[int] = []

    def lookup(tokens: np.ndarray, req_id: str) -> int:
        calls.append(threading.get_ident())
        return len(tokens)

    server = LookupServer(sock_path, lookup)
    try:
        assert LookupClient(sock_path).lookup([1, 2, 3]) == 3
        assert calls == [threading.get_ident()]  # answered in the caller's own thread
    finally:
        server.close()


def test_failing_lookup_reaches_the_client_as_an_error_not_a_hang(sock_path: str) -> None:
    def broken(tokens: np.ndarray, req_id: str) -> int:
        raise RuntimeError("backend exploded")

    server = LookupServer(sock_path, broken)
    from lmcache_connector_vllm import lookup_channel

    lookup_channel._LOCAL.pop(sock_path)
    client = LookupClient(sock_path, timeout=5)
    try:
        with pytest.raises(LookupChannelError, match="failed to look up"):
            client.lookup([1, 2])
        server._lookup = prefix_of([1, 2])  # the same connection keeps working afterwards
        assert client.lookup([1, 2]) == 2
    finally:
        client.close()
        server.close()


def test_client_without_a_worker_fails_within_its_timeout_then_fails_fast(sock_path: str) -> None:
    client = LookupClient(sock_path, timeout=0.2)
    with pytest.raises(LookupChannelError, match="no lmcache worker answers"):
        client.lookup([1])
    started = time.monotonic()
    with pytest.raises(LookupChannelError, match="retrying later"):
        client.lookup([1])  # the scheduler does not wait again on every request
    assert time.monotonic() - started < 0.1


def test_client_reconnects_to_a_restarted_worker(sock_path: str) -> None:
    from lmcache_connector_vllm import lookup_channel

    client = LookupClient(sock_path, timeout=5)
    for answer in (3, 5):
        server = LookupServer(sock_path, lambda tokens, req_id, answer=answer: answer)
        lookup_channel._LOCAL.pop(sock_path)
        try:
            assert client.lookup([0] * 8) == answer
        finally:
            server.close()
    client.close()


def test_channel_paths_differ_per_vllm_instance_and_rank_and_fit_a_socket_address() -> None:
    paths = {
        channel_path(engine, instance, rank)
        for engine in ("e1", "e2")
        for instance in ("lmcache_default_instance", "other")
        for rank in (0, 1)
    }
    assert len(paths) == 8
    assert all(len(p.encode()) < 100 for p in paths)
    assert channel_path("e1", "x", 0) == channel_path("e1", "x", 0)
