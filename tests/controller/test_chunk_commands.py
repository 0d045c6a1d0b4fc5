"""``/pin``, ``/unpin``, ``/move`` and how ``/clear`` treats pins, against a real controller, a
real nats-server and ``examples/instance.py`` processes (real CPU and disk backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .support import INSTANCE, PROMPT, ControllerRunner, InstanceProcess, two_ranks, wait_for

pytestmark = pytest.mark.timeout(180)

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
CHUNK = 4  # tokens per chunk: the 12-token prompt is 3 chunks
#: instance.py's KV is [2 layers, 2, tokens, 64] bfloat16: 512 bytes a token, 2 KiB a chunk
CHUNK_BYTES = 2 * 2 * CHUNK * 64 * 2
OTHER = [9000 + i for i in range(12)]  # another 3-chunk prompt, never pinned


def _instance(nats_url: str, tmp: Path, *, disk: bool, cpu_chunks: int = 1000) -> InstanceProcess:
    """An instance.py process answering --control requests, chunk size 4, a CPU pool of
    ``cpu_chunks`` chunks (GiB given exactly: a power-of-two fraction)."""
    env = {"LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_MAX_LOCAL_CPU_SIZE": repr(cpu_chunks * CHUNK_BYTES / 2**30)}
    return InstanceProcess(nats_url, tmp, disk=disk, args=["--control"], env=env)


def _pressure(inst: InstanceProcess, chunks: int, seed: int) -> None:
    """Store ``chunks`` chunks of fresh tokens, far more than the CPU pool holds."""
    tokens = np.random.default_rng(seed).integers(20_000, 120_000, size=chunks * CHUNK).tolist()
    assert inst.control("store", tokens)["stored_tokens"] == chunks * CHUNK


def _held(inst: InstanceProcess, tokens: list[int]) -> dict[str, list[bool]]:
    """Per location, whether the instance's backend holds each chunk of ``tokens``."""
    return inst.control("where", tokens)["chunks"]


def _post(controller: ControllerRunner, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = controller.client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def _finished(controller: ControllerRunner, event_id: str, kind: str) -> None:
    status = _post(controller, "/check_finish", {"event_id": event_id})
    assert (status["status"], status["kind"]) == ("finished", kind), status


@pytest.fixture
def small_cpu(nats_url: str, controller: ControllerRunner, tmp_path: Path):
    """An instance with a 10-chunk CPU pool (no disk) holding the prompt and OTHER."""
    inst = _instance(nats_url, tmp_path, disk=False, cpu_chunks=10)
    try:
        assert inst.ready["stored_tokens"] == 12
        inst.control("store", OTHER)
        wait_for(lambda: controller.lookup(PROMPT) == {INSTANCE: [CPU, 12]}, what="prompt credited")
        wait_for(lambda: controller.lookup(OTHER) == {INSTANCE: [CPU, 12]}, what="other credited")
        yield inst
    finally:
        inst.close()


def test_pinned_chunks_survive_eviction_pressure_and_unpinned_ones_do_not(
    controller: ControllerRunner, small_cpu: InstanceProcess
) -> None:
    inst = small_cpu
    pinned = _post(controller, "/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})
    assert set(pinned) == {"event_id", "num_tokens"} and pinned["num_tokens"] == 12
    _finished(controller, pinned["event_id"], "pin")
    assert inst.control("stats")["stats"][CPU]["pinned"] == 3

    _pressure(inst, chunks=40, seed=1)  # four pools' worth of new chunks
    stats = inst.control("stats")["stats"][CPU]
    assert stats["evictions"] >= 30, stats
    assert _held(inst, PROMPT)[CPU] == [True, True, True]
    assert _held(inst, OTHER)[CPU] == [False, False, False]  # the pressure was real
    wait_for(lambda: controller.lookup(OTHER) == {}, what="evicted chunks leave the index")
    assert controller.lookup(PROMPT) == {INSTANCE: [CPU, 12]}

    unpinned = _post(controller, "/unpin", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})
    assert unpinned["num_tokens"] == 12
    _finished(controller, unpinned["event_id"], "unpin")
    # pinning only a prefix counts only the chunks held; unpinning what is not pinned counts nothing
    assert _post(controller, "/unpin", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})["num_tokens"] == 0
    _pressure(inst, chunks=40, seed=2)
    assert _held(inst, PROMPT)[CPU] == [False, False, False]
    wait_for(lambda: controller.lookup(PROMPT) == {}, what="the unpinned prompt evicted")


def test_clear_removes_pinned_chunks_too(controller: ControllerRunner, small_cpu: InstanceProcess) -> None:
    inst = small_cpu
    assert _post(controller, "/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT[:8]})["num_tokens"] == 8
    cleared = _post(controller, "/clear", {"instance_id": INSTANCE, "location": CPU})
    assert cleared["num_tokens"] == 24  # the pinned 8 tokens, the prompt's last chunk, OTHER
    assert _held(inst, PROMPT)[CPU] == [False, False, False]
    assert inst.control("stats")["stats"][CPU]["pinned"] == 0
    assert controller.lookup(PROMPT) == {}
    # pinning what is not there pins nothing
    assert _post(controller, "/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})["num_tokens"] == 0


def test_move_between_two_locations_of_an_instance_with_and_without_copy(
    nats_url: str, controller: ControllerRunner, tmp_path: Path
) -> None:
    inst = _instance(nats_url, tmp_path, disk=True)
    try:
        wait_for(lambda: controller.lookup(PROMPT) == {INSTANCE: [CPU, 12]}, what="prompt credited")
        assert _post(controller, "/clear", {"instance_id": INSTANCE, "location": DISK})["num_tokens"] == 12
        assert _held(inst, PROMPT) == {CPU: [True] * 3, DISK: [False] * 3}

        body = {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK], "tokens": PROMPT}
        moved = _post(controller, "/move", body)
        assert set(moved) == {"event_id", "num_tokens"} and moved["num_tokens"] == 12
        _finished(controller, moved["event_id"], "move")
        assert _held(inst, PROMPT) == {CPU: [False] * 3, DISK: [True] * 3}
        # the answer waited for the move's events: no polling needed
        assert controller.lookup(PROMPT) == {INSTANCE: [DISK, 12]}
        info = _post(controller, "/query_worker_info", {"instance_id": INSTANCE})["worker_infos"][0]
        assert info["locations"] == {CPU: {"chunks": 0, "tokens": 0}, DISK: {"chunks": 3, "tokens": 12}}

        # copy back the first two chunks only: both locations hold them afterwards
        body = {"old_position": [INSTANCE, DISK], "new_position": [INSTANCE, CPU], "tokens": PROMPT[:8],
                "should_copy": True}
        assert _post(controller, "/move", body)["num_tokens"] == 8
        assert _held(inst, PROMPT) == {CPU: [True, True, False], DISK: [True] * 3}
        assert controller.lookup(PROMPT) == {INSTANCE: [DISK, 12]}  # disk holds all 3, CPU 2
        assert controller.lookup(PROMPT[:8]) == {INSTANCE: [CPU, 8]}  # a tie goes to the fastest

        # no tokens: every chunk at the old location (those the new one holds already count too)
        inst.control("store", OTHER)
        wait_for(lambda: controller.lookup(OTHER) == {INSTANCE: [CPU, 12]}, what="other credited")
        body = {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK]}
        assert _post(controller, "/move", body)["num_tokens"] == 8 + 12
        assert _held(inst, PROMPT + OTHER)[CPU] == [False] * 6
        assert _held(inst, OTHER)[DISK] == [True] * 3
        assert controller.lookup(OTHER) == {INSTANCE: [DISK, 12]}
        # and an empty location moves nothing
        assert _post(controller, "/move", {**body, "tokens": []})["num_tokens"] == 0
    finally:
        inst.close()


def test_move_refuses_same_location_unknown_names_and_other_instances(
    nats_url: str, controller: ControllerRunner, tmp_path: Path, make_instance
) -> None:
    inst = _instance(nats_url, tmp_path, disk=True)
    try:
        wait_for(lambda: controller.lookup(PROMPT), what="prompt credited")
        same = _post(controller, "/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, CPU]}, 400)
        assert "name two different locations" in same["detail"]
        unknown = _post(controller, "/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, "GPU"]}, 400)
        assert unknown == {"detail": f"unknown location 'GPU'; available: {CPU}, {DISK}"}
        nobody = _post(controller, "/move", {"old_position": [INSTANCE, CPU], "new_position": ["nope", CPU]}, 404)
        assert nobody["detail"].startswith("unknown instance 'nope'")
        other = make_instance("inst-b")
        other.sync()
        wait_for(lambda: "inst-b" in controller.call(lambda: set(controller.controller.instances)), what="b registered")
        across = _post(controller, "/move", {"old_position": [INSTANCE, CPU], "new_position": ["inst-b", CPU]}, 400)
        assert "give its token ids in 'tokens'" in across["detail"]
        no_channel = _post(controller, "/move", {"old_position": [INSTANCE, CPU], "new_position": ["inst-b", CPU],
                                                 "tokens": PROMPT}, 409)
        assert "instance 'inst-b' rank 0 serves no peer channel" in no_channel["detail"]
        assert _held(inst, PROMPT)[CPU] == [True] * 3  # nothing moved
        for path in ("/pin", "/unpin"):
            assert _post(controller, path, {"instance_id": INSTANCE, "location": "GPU", "tokens": PROMPT}, 400)[
                "detail"
            ] == f"unknown location 'GPU'; available: {CPU}, {DISK}"
            assert _post(controller, path, {"instance_id": "nope", "location": CPU, "tokens": [1]}, 404)
    finally:
        inst.close()


def test_pin_reaches_every_rank_and_reports_each_when_they_differ(
    controller: ControllerRunner, make_instance
) -> None:
    rank0, rank1 = two_ranks(make_instance, "tp", PROMPT, PROMPT[:4])
    wait_for(lambda: controller.lookup(PROMPT) == {"tp": [CPU, 4]}, what="both ranks credited")
    pinned = _post(controller, "/pin", {"instance_id": "tp", "location": CPU, "tokens": PROMPT})
    assert pinned["num_tokens"] == 16
    assert pinned["num_tokens_per_worker"] == {"0": 12, "1": 4}
    assert rank0.engine.stats()[CPU]["pinned"] == 3 and rank1.engine.stats()[CPU]["pinned"] == 1
    assert rank0.engine.stats()[DISK]["pinned_bytes"] == 0  # only the location named


@pytest.mark.parametrize(
    "path, body, loc",
    [
        ("/pin", {"instance_id": INSTANCE, "location": CPU}, ["body", "tokens"]),
        ("/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": [1, "2"]}, ["body", "tokens", 1]),
        ("/unpin", {"instance_id": INSTANCE, "location": "", "tokens": [1]}, ["body", "location"]),
        ("/move", {"old_position": [INSTANCE, CPU, "x"], "new_position": [INSTANCE, DISK]}, ["body", "old_position"]),
        ("/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK], "should_copy": "yes"},
         ["body", "should_copy"]),
        ("/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK], "tokens": [-1]},
         ["body", "tokens", 0]),
        ("/query_instance", {"ip": ""}, ["body", "ip"]),
    ],
)
def test_malformed_bodies_are_a_422_naming_the_field(
    controller: ControllerRunner, path: str, body: dict[str, Any], loc: list[Any]
) -> None:
    detail = _post(controller, path, body, 422)["detail"]
    assert detail[0]["loc"][: len(loc)] == loc, detail


def test_token_bodies_may_be_256_kib_and_larger_ones_are_a_413(controller: ControllerRunner) -> None:
    # 32,768 six-digit ids (a 32k-token prompt, about 230 KB) get past the body limit: the
    # instance is unknown, so the answer is a 404 from the route, not a 413
    prompt = list(range(100_000, 100_000 + 32_768))
    for path, body in [
        ("/pin", {"instance_id": "nope", "location": CPU, "tokens": prompt}),
        ("/move", {"old_position": ["nope", CPU], "new_position": ["nope", DISK], "tokens": prompt}),
    ]:
        assert _post(controller, path, body, 404)["detail"].startswith("unknown instance 'nope'")
        too_big = {**body, "tokens": prompt * 2}
        assert _post(controller, path, too_big, 413)["detail"].endswith(f"{path} accepts at most 262144 bytes")
    # the other endpoints keep 64 KiB
    assert _post(controller, "/query_instance", {"ip": "x" * 70_000}, 413)
