"""Peer-to-peer transfer between real instances: a serving ``examples/instance.py`` process, an
in-process engine with a real worker, a real controller and nats-server, TCP on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache_core.errors import ConfigError
from lmcache_core.p2p.channel import channel_key
from lmcache_core.p2p.client import fetch_chunks
from lmcache_core.p2p.server import shard_of
from lmcache_core.testing import Proxy, free_port

from .p2p_support import SECRET, kv_for, p2p_settings, serving_instance
from .support import REPO, kv, wait_for

TOKENS = list(range(1000, 2000))  # four chunks of 256 (the last one 232 tokens)
CHUNK = 256


def _tokens_arg(tokens: list[int]) -> list[str]:
    return ["--tokens", ",".join(map(str, tokens))]


def random_tokens(chunks: int, seed: int = 0) -> list[int]:
    """The token ids ``instance.py --store-random`` stores (its own recipe)."""
    return np.random.default_rng(seed).integers(0, 128_000, size=chunks * CHUNK).tolist()


def test_engine_fetches_from_the_peer_the_controller_names_and_is_then_credited(controller, make_instance, nats_url, tmp_path: Path) -> None:
    a, url = serving_instance(nats_url, tmp_path, "A", _tokens_arg(TOKENS), chunk_size=CHUNK)
    try:
        b = make_instance("B", chunk_size=CHUNK, **p2p_settings())
        b.sync()
        infos = controller.client.post("/query_worker_info", json={"instance_id": "A"}).json()["worker_infos"]
        assert infos[0]["peer_init_url"] == url
        assert b.engine.lookup(TOKENS) == 0
        assert b.engine.fetch_from_peers(TOKENS).tokens == len(TOKENS)
        found, tensor = b.engine.retrieve_tensor(TOKENS)
        assert found == len(TOKENS) and torch.equal(tensor, kv_for(TOKENS, 2, 64))
        assert b.worker.peers.fetched_bytes == {f"A/0 at {url}": tensor.nbytes}
        b.sync()
        wait_for(lambda: controller.lookup(TOKENS).get("B", [None, 0])[1] == len(TOKENS), what="B credited")
        assert b.engine.fetch_from_peers(TOKENS) is None  # now local: nothing to fetch
    finally:
        a.close()


def test_with_two_ranks_each_rank_fetches_its_own_shard_from_the_same_rank_of_the_peer(controller, make_instance) -> None:
    ports = {name: [free_port(), free_port()] for name in ("A", "B")}
    ranks = {
        (name, r): make_instance(
            name, chunk_size=CHUNK, worker_id=r, world_size=2, **{**p2p_settings(), "p2p_init_ports": ports[name]}
        )
        for name in ("A", "B")
        for r in (0, 1)
    }
    for r in (0, 1):
        ranks["A", r].store(TOKENS, seed=r)  # each rank holds its own shard of the KV
    for inst in ranks.values():
        inst.sync()
    wait_for(lambda: controller.lookup(TOKENS).get("A") == ["LocalCPUBackend", len(TOKENS)], what="A credited")
    for r in (0, 1):
        b = ranks["B", r]
        assert b.engine.fetch_from_peers(TOKENS).tokens == len(TOKENS)
        # rank r asked for rank r: the bytes are A's rank-r shard, from A's rank-r channel
        assert torch.equal(b.engine.retrieve_tensor(TOKENS)[1], kv(len(TOKENS), r))
        assert list(b.worker.peers.fetched_bytes) == [f"A/{r} at 127.0.0.1:{ports['A'][r]}"]


def test_only_the_missing_part_of_a_prefix_is_fetched(controller, make_instance, nats_url, tmp_path: Path) -> None:
    a, url = serving_instance(nats_url, tmp_path, "A", _tokens_arg(TOKENS), chunk_size=CHUNK)
    try:
        b = make_instance("B", chunk_size=CHUNK, **p2p_settings())
        b.engine.store(TOKENS[:512], kv_for(TOKENS[:512], 2, 64))
        b.sync()
        assert b.engine.fetch_from_peers(TOKENS).tokens == len(TOKENS) - 512
        assert b.worker.peers.last_fetch.chunks == 2
        assert torch.equal(b.engine.retrieve_tensor(TOKENS)[1], kv_for(TOKENS, 2, 64))
    finally:
        a.close()


def test_a_peer_with_wrong_credentials_is_refused_and_logged(controller, make_instance, nats_url, tmp_path: Path) -> None:
    a, url = serving_instance(nats_url, tmp_path, "A", _tokens_arg(TOKENS), chunk_size=CHUNK)
    try:
        b = make_instance("B", chunk_size=CHUNK, **p2p_settings(secret="not-the-secret"))
        b.sync()
        result = b.engine.fetch_from_peers(TOKENS)
        assert result.tokens == 0 and "wrong credentials" in (result.error or "")
        assert b.engine.lookup(TOKENS) == 0
    finally:
        a.proc.send_signal(signal.SIGTERM)
        log = a.proc.stderr.read()
        a.close()
    assert "refused peer 127.0.0.1:" in log and "wrong credentials" in log


def test_a_chunk_corrupted_in_flight_is_detected_and_not_stored(controller, make_instance, nats_url, tmp_path: Path) -> None:
    a, url = serving_instance(nats_url, tmp_path, "A", _tokens_arg(TOKENS), chunk_size=CHUNK)
    try:
        b = make_instance("B", chunk_size=CHUNK, **p2p_settings())
        spans = b.engine.hasher.spans(TOKENS)
        chunk_bytes = kv_for(TOKENS[:CHUNK], 2, 64).nbytes
        # a byte of the second chunk's data flips between A and B
        with Proxy(url, corrupt_at=int(chunk_bytes * 1.5)) as proxy:
            result = fetch_chunks(
                proxy.url, channel_key(b.settings), shard_of(b.engine), spans,
                lambda span, t: b.engine.store_received(span.chunk_hash, span.num_tokens, t),
                step_timeout=5.0, total_timeout=10.0, max_chunk_bytes=1 << 30,
            )
        assert result.chunks == 1 and "does not match its checksum" in (result.error or "")
        assert b.engine.lookup(TOKENS) == CHUNK  # the first, whole and checked; not the second
        assert torch.equal(b.engine.retrieve_tensor(TOKENS)[1], kv_for(TOKENS[:CHUNK], 2, 64))
    finally:
        a.close()


def test_a_peer_killed_mid_transfer_leaves_only_whole_checked_chunks(controller, make_instance, nats_url, tmp_path: Path) -> None:
    # 8 MiB chunks: [4 layers, 2, 256 tokens, 2048] bfloat16
    a, url = serving_instance(
        nats_url, tmp_path, "A", ["--store-random", "6", "--num-layers", "4", "--hidden", "2048"],
        chunk_size=CHUNK, max_local_cpu_size=0.2,
    )
    tokens = random_tokens(6)
    chunk_bytes = 8 << 20
    try:
        b = make_instance("B", chunk_size=CHUNK, **p2p_settings())
        spans = b.engine.hasher.spans(tokens)
        outcome = {}
        with Proxy(url, stall_after=int(chunk_bytes * 2.5)) as proxy:
            fetching = threading.Thread(target=lambda: outcome.setdefault("result", fetch_chunks(
                proxy.url, channel_key(b.settings), shard_of(b.engine), spans,
                lambda span, t: b.engine.store_received(span.chunk_hash, span.num_tokens, t),
                step_timeout=30.0, total_timeout=60.0, max_chunk_bytes=1 << 30,
            )))
            fetching.start()
            assert proxy.stalled.wait(60), "the transfer never reached the middle of the third chunk"
            a.kill(signal.SIGKILL)  # the peer dies mid-chunk
            a.proc.wait(10)
            proxy.cut()
            fetching.join(60)
        result = outcome["result"]
        assert result.chunks == 2 and result.error
        # what B holds is exactly A's first two chunks; the rest is a miss, to be computed
        assert b.engine.lookup(tokens) == 2 * CHUNK
        expected = torch.cat([kv_for(tokens[i : i + CHUNK], 4, 2048) for i in (0, CHUNK)], dim=2)
        assert torch.equal(b.engine.retrieve_tensor(tokens)[1], expected)
        # and a later fetch, with the peer gone, costs nothing but the miss
        later = b.engine.fetch_from_peers(tokens)
        assert later is None or later.tokens == 0
        assert b.engine.lookup(tokens) == 2 * CHUNK
    finally:
        a.close()


FETCH_AND_MEASURE = """
import json, resource, sys
from lmcache_core.keys import TokenHasher
from lmcache_core.p2p.channel import channel_key
from lmcache_core.p2p.client import fetch_chunks
from lmcache_core.config import load_settings
url, tokens, cap = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
spans = TokenHasher(256).spans(tokens)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = fetch_chunks(url, channel_key(load_settings(p2p_secret=sys.argv[4])), ["demo-model", 1, 0, "bfloat16", 256, ""],
                      spans, lambda span, t: None, step_timeout=30, total_timeout=120, max_chunk_bytes=cap)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"chunks": result.chunks, "bytes": result.bytes, "growth": after - before, "error": result.error}))
"""


def test_a_fetch_holds_one_chunk_at_a_time_and_refuses_one_over_the_cap(controller, nats_url, tmp_path: Path) -> None:
    a, url = serving_instance(
        nats_url, tmp_path, "A", ["--store-random", "16", "--num-layers", "4", "--hidden", "2048"],
        chunk_size=CHUNK, max_local_cpu_size=0.5,
    )
    tokens = json.dumps(random_tokens(16))
    chunk_bytes = 8 << 20

    def fetch(cap: int) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", FETCH_AND_MEASURE, url, tokens, str(cap), SECRET],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    try:
        moved = fetch(1 << 30)
        assert moved["chunks"] == 16 and moved["bytes"] == 16 * chunk_bytes and moved["error"] is None
        assert moved["growth"] < 4 * chunk_bytes, moved  # 128 MiB moved through a few chunks' worth
        refused = fetch(chunk_bytes - 1)
        assert refused["chunks"] == 0 and "p2p_max_chunk_bytes" in refused["error"]
    finally:
        a.close()


def test_a_peer_channel_beyond_loopback_needs_a_secret(make_instance) -> None:
    with pytest.raises(ConfigError, match="p2p_secret"):
        make_instance("C", chunk_size=CHUNK, enable_p2p=True, p2p_host="0.0.0.0", p2p_init_ports=0)


def test_a_wildcard_bind_advertises_a_reachable_address_and_advertise_host_overrides_it(
    controller, make_instance
) -> None:
    c_port, d_port = free_port(), free_port()
    make_instance("C", chunk_size=CHUNK, **{**p2p_settings(c_port), "p2p_host": "0.0.0.0"})
    make_instance("D", chunk_size=CHUNK, **{**p2p_settings(d_port), "p2p_advertise_host": "kv-d.example"})

    def peer_url(instance_id: str) -> str | None:
        answer = controller.client.post("/query_worker_info", json={"instance_id": instance_id})
        return answer.json()["worker_infos"][0]["peer_init_url"] if answer.status_code == 200 else None

    # C listens on every interface; peers are told the address of its route to the bus (here
    # loopback), never 0.0.0.0
    wait_for(lambda: peer_url("C") == f"127.0.0.1:{c_port}", what="C's peer_init_url")
    wait_for(lambda: peer_url("D") == f"kv-d.example:{d_port}", what="D's peer_init_url")


@pytest.mark.parametrize("should_copy", [True, False])
def test_a_move_between_instances_pushes_the_chunks_and_lookup_credits_the_target(
    controller, make_instance, should_copy: bool
) -> None:
    a = make_instance("A", chunk_size=CHUNK, **p2p_settings())
    b = make_instance("B", chunk_size=CHUNK, **p2p_settings())
    a.store(TOKENS)
    a.sync()
    b.sync()
    wait_for(lambda: controller.lookup(TOKENS).get("A") == ["LocalCPUBackend", len(TOKENS)], what="A credited")
    answer = controller.client.post("/move", json={
        "old_position": ["A", "LocalCPUBackend"], "new_position": ["B", "LocalCPUBackend"],
        "tokens": TOKENS, "should_copy": should_copy,
    })
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(TOKENS)
    status = controller.client.post("/check_finish", json={"event_id": answer.json()["event_id"]}).json()
    assert (status["status"], status["kind"]) == ("finished", "move")
    b.sync()
    a.sync()
    expected_a = ["LocalCPUBackend", len(TOKENS)] if should_copy else ["LocalDiskBackend", len(TOKENS)]
    wait_for(
        lambda: controller.lookup(TOKENS).get("B") == ["LocalCPUBackend", len(TOKENS)]
        and controller.lookup(TOKENS).get("A") == expected_a,
        what="the index after the move",
    )
    # loads: B serves the same KV from its CPU tier; A kept its copy only with should_copy
    assert torch.equal(b.engine.retrieve_tensor(TOKENS)[1], kv(len(TOKENS)))
    cpu_a = a.engine.backend("LocalCPUBackend")
    assert all(cpu_a.contains(a.engine.keys.key(s.chunk_hash)) == should_copy for s in a.engine.hasher.spans(TOKENS))


def test_a_move_to_an_instance_without_a_peer_channel_is_refused(controller, make_instance) -> None:
    a = make_instance("A", chunk_size=CHUNK, **p2p_settings())
    c = make_instance("C", chunk_size=CHUNK)
    a.store(TOKENS)
    a.sync()
    c.sync()
    answer = controller.client.post("/move", json={
        "old_position": ["A", "LocalCPUBackend"], "new_position": ["C", "LocalCPUBackend"], "tokens": TOKENS,
    })
    assert answer.status_code == 409 and "instance 'C' rank 0 serves no peer channel" in answer.json()["detail"]
    assert a.engine.lookup(TOKENS) == len(TOKENS)


def test_a_move_that_one_target_rank_cannot_take_is_refused_before_any_rank_moves(controller, make_instance) -> None:
    a_ports = [free_port(), free_port()]
    a = [
        make_instance("A", chunk_size=CHUNK, worker_id=r, world_size=2, **{**p2p_settings(), "p2p_init_ports": a_ports})
        for r in (0, 1)
    ]
    c = [
        make_instance("C", chunk_size=CHUNK, worker_id=0, world_size=2, **p2p_settings()),
        make_instance("C", chunk_size=CHUNK, worker_id=1, world_size=2),  # no peer channel
    ]
    for r, inst in enumerate(a):
        inst.store(TOKENS, seed=r)
    for inst in [*a, *c]:
        inst.sync()
    answer = controller.client.post("/move", json={
        "old_position": ["A", "LocalCPUBackend"], "new_position": ["C", "LocalCPUBackend"], "tokens": TOKENS,
    })
    assert answer.status_code == 409 and "instance 'C' rank 1 serves no peer channel" in answer.json()["detail"]
    # rank 0 did not go ahead alone: A still holds every chunk in its CPU tier, C nothing
    for inst in a:
        cpu = inst.engine.backend("LocalCPUBackend")
        assert all(cpu.contains(inst.engine.keys.key(s.chunk_hash)) for s in inst.engine.hasher.spans(TOKENS))
    assert c[0].engine.lookup(TOKENS) == 0


def test_enable_p2p_without_its_host_and_ports_is_a_start_error_naming_them(make_instance) -> None:
    with pytest.raises(ConfigError, match="p2p_host and p2p_init_ports"):
        make_instance("C", chunk_size=CHUNK, enable_p2p=True)


def test_a_rank_beyond_the_listed_ports_is_a_start_error(make_instance) -> None:
    with pytest.raises(ConfigError, match="p2p_init_ports lists 1 port"):
        make_instance("C", chunk_size=CHUNK, worker_id=1, world_size=2, **p2p_settings())


def test_a_port_in_use_is_a_start_error_naming_the_keys(make_instance) -> None:
    a = make_instance("A", chunk_size=CHUNK, **p2p_settings())
    port = int(a.worker.peers.url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=r"cannot listen for peers on 127\.0\.0\.1:\d+ \(p2p_host, p2p_init_ports\)"):
        make_instance("B", chunk_size=CHUNK, **p2p_settings(port=port))
