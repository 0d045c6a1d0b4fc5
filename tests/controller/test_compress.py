"""/compress and /decompress against real instances on a real nats-server: chunks are
re-encoded in place on every rank, /lookup answers as before, and the KV reads back (bit for
bit through zstd, within the stated bound through int8), from the same process and from a
new one after the stand-in instance process stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata

from .support import PROMPT, REPO, ControllerRunner, InstanceProcess, wait_for

sys.path.insert(0, str(REPO / "examples"))
from instance import kv_for  # noqa: E402  (the stand-in instance's deterministic KV)

pytest.importorskip("lmcache_codecs", reason="needs the codecs plugin: pip install -e plugins/codecs")
from lmcache_codecs import int8_error_bound  # noqa: E402

pytestmark = pytest.mark.timeout(180)
TOKENS = list(range(1000, 1048))  # 3 chunks of 16


def _check(controller: ControllerRunner, event_id: str, kind: str) -> None:
    status = controller.client.post("/check_finish", json={"event_id": event_id}).json()
    assert status == {"event_id": event_id, "status": "finished", "kind": kind, "detail": None}


def test_compress_and_decompress_recode_a_location_in_place_and_lookup_is_unchanged(
    controller: ControllerRunner, make_instance
) -> None:
    inst = make_instance("inst-c", chunk_size=16)
    data = kv_for(TOKENS, 2, 256)
    inst.engine.store(TOKENS, data)
    inst.engine.flush(10.0)
    inst.sync()
    credited = {"inst-c": ["LocalCPUBackend", 48]}
    wait_for(lambda: controller.lookup(TOKENS) == credited, what="instance credited")
    cpu = inst.engine.backend("LocalCPUBackend")
    raw_bytes = cpu.stats()["used_bytes"]

    body = {"instance_id": "inst-c", "method": "zstd", "location": "LocalCPUBackend"}
    response = controller.client.post("/compress", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["num_tokens"] == 48 and answer["event_id"].startswith("compress-")
    _check(controller, answer["event_id"], "compress")
    assert cpu.stats()["used_bytes"] < raw_bytes / 2
    assert controller.lookup(TOKENS) == credited
    n, got = inst.engine.retrieve_tensor(TOKENS)
    assert n == 48 and torch.equal(got.view(torch.int16), data.view(torch.int16))

    # only the first chunk's tokens, through the lossy codec
    response = controller.client.post("/compress", json={**body, "method": "int8", "tokens": TOKENS[:16]})
    assert response.json()["num_tokens"] == 16
    response = controller.client.post("/decompress", json=body)
    assert response.status_code == 200 and response.json()["num_tokens"] == 32
    _check(controller, response.json()["event_id"], "decompress")
    response = controller.client.post("/decompress", json={**body, "method": "int8"})
    assert response.json()["num_tokens"] == 16
    assert cpu.stats()["used_bytes"] == raw_bytes
    n, got = inst.engine.retrieve_tensor(TOKENS)
    assert torch.equal(got[:, :, 16:].view(torch.int16), data[:, :, 16:].view(torch.int16))
    first, expected = got[:, :, :16], data[:, :, :16]
    assert bool(((first.double() - expected.double()).abs() <= int8_error_bound(expected, first)).all())
    assert controller.lookup(TOKENS) == credited


def test_compress_reaches_every_rank_and_sums_their_tokens(controller: ControllerRunner, make_instance) -> None:
    ranks = [make_instance("tp", chunk_size=16, worker_id=r, world_size=2) for r in (0, 1)]
    ranks[0].engine.store(TOKENS, kv_for(TOKENS, 2, 256))
    ranks[1].engine.store(TOKENS[:16], kv_for(TOKENS[:16], 2, 256))
    for inst in ranks:
        inst.sync()
    wait_for(lambda: controller.lookup(TOKENS) == {"tp": ["LocalCPUBackend", 16]}, what="both ranks credited")
    response = controller.client.post("/compress", json={"instance_id": "tp", "method": "zstd", "location": "LocalCPUBackend"})
    assert response.json()["num_tokens"] == 64
    assert response.json()["num_tokens_per_worker"] == {"0": 48, "1": 16}


def test_bad_compress_requests_get_a_4xx_naming_what_would_be_right(controller: ControllerRunner, make_instance) -> None:
    inst = make_instance("inst-e", chunk_size=16)
    inst.store(PROMPT)
    inst.sync()
    post = controller.client.post
    body = {"instance_id": "inst-e", "method": "zstd", "location": "LocalCPUBackend"}

    response = post("/compress", json={**body, "method": "zstdd"})
    assert response.status_code == 400
    assert response.json()["detail"] == "unknown codec 'zstdd'; available: int8, zstd"
    response = post("/decompress", json={**body, "location": "LocalGPUBackend"})
    assert response.status_code == 400
    assert response.json()["detail"] == "unknown location 'LocalGPUBackend'; available: LocalCPUBackend, LocalDiskBackend"
    response = post("/compress", json={**body, "instance_id": "nope"})
    assert response.status_code == 404 and "registered instances: inst-e" in response.json()["detail"]
    for bad in ({k: v for k, v in body.items() if k != "method"}, {**body, "tokens": [-1]}, {**body, "extra": 1}):
        response = post("/compress", json=bad)
        assert response.status_code == 422, bad
        assert response.json()["detail"]
    schema = controller.client.get("/openapi.json").json()
    assert {"/compress", "/decompress"} <= set(schema["paths"])
    assert schema["paths"]["/compress"]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_a_disk_chunk_compressed_through_the_stand_in_process_reads_back_bit_for_bit_in_a_new_process(
    controller: ControllerRunner, nats_url: str, tmp_path: Path
) -> None:
    proc = InstanceProcess(nats_url, tmp_path, instance_id="standin", args=["--hidden", "256"])
    try:
        assert proc.ready["stored_tokens"] == 12
        credited = {"standin": ["LocalCPUBackend", 12]}
        wait_for(lambda: controller.lookup(PROMPT) == credited, what="stand-in credited")
        for location in ("LocalDiskBackend", "LocalCPUBackend"):
            body = {"instance_id": "standin", "method": "zstd", "location": location}
            response = controller.client.post("/compress", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["num_tokens"] == 12
        assert controller.lookup(PROMPT) == credited
    finally:
        proc.close()
    assert proc.proc.returncode == 0
    settings = load_settings(
        config_file=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.1, local_cpu=False,
        lmcache_instance_id="standin",
    )
    with CacheEngine(settings, EngineMetadata("demo-model")) as engine:
        disk = engine.backend("LocalDiskBackend")
        key = engine.keys.key(engine.hasher.hashes(PROMPT)[0])
        with disk.get(key) as view:
            assert view.encoding is not None and view.encoding.codec == "zstd"
            assert view.tensor.numel() < 2 * 2 * 12 * 256 * 2 / 2
        n, got = engine.retrieve_tensor(PROMPT)
    assert n == 12
    assert torch.equal(got.view(torch.int16), kv_for(PROMPT, 2, 256).view(torch.int16))
