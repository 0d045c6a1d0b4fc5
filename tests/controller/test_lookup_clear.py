"""Lookup and clear against real instances (real engines and workers on a real nats-server)."""

from __future__ import annotations

import pytest

from .support import PROMPT, ControllerRunner, two_ranks, wait_for

pytestmark = pytest.mark.timeout(120)


def test_lookup_credits_each_instance_with_its_own_prefix_and_clear_touches_only_one(
    controller: ControllerRunner, make_instance
) -> None:
    # chunk size 4: prompt of 12 tokens = 3 chunks; a holds all of it, b the first 8 tokens
    a = make_instance("inst-a")
    b = make_instance("inst-b")
    a.store(PROMPT)
    b.store(PROMPT[:8])
    b.store([7, 7, 7, 7, 7])  # something else, which must survive a's clear
    for inst in (a, b):
        inst.sync()
    expected = {"inst-a": ["LocalCPUBackend", 12], "inst-b": ["LocalCPUBackend", 8]}
    wait_for(lambda: controller.lookup(PROMPT) == expected, what="both instances credited")
    assert controller.lookup(PROMPT, instance_id="inst-b") == {"inst-b": ["LocalCPUBackend", 8]}
    # a partial last chunk hashes differently from the full chunk, so only the first chunk matches
    assert controller.lookup(PROMPT[:6]) == {"inst-a": ["LocalCPUBackend", 4], "inst-b": ["LocalCPUBackend", 4]}
    assert controller.lookup(PROMPT, model="another-model") == {}

    response = controller.client.post("/clear", json={"instance_id": "inst-a", "location": "LocalCPUBackend"})
    assert response.status_code == 200, response.text
    assert response.json()["num_tokens"] == 12
    # disk still holds a's prompt; the CPU entries are gone the moment /clear returned
    assert controller.lookup(PROMPT) == {"inst-a": ["LocalDiskBackend", 12], "inst-b": ["LocalCPUBackend", 8]}

    response = controller.client.post("/clear", json={"instance_id": "inst-a", "location": "LocalDiskBackend"})
    assert response.json()["num_tokens"] == 12
    assert controller.lookup(PROMPT) == {"inst-b": ["LocalCPUBackend", 8]}
    assert controller.lookup([7, 7, 7, 7, 7]) == {"inst-b": ["LocalCPUBackend", 5]}
    counts = controller.holder_counts()
    assert counts[("inst-b", 0, "LocalCPUBackend")] == 4  # 2 prompt chunks + 2 of the other
    assert {k: v for k, v in counts.items() if k[0] == "inst-b"} == b.inventory_counts()
    assert counts[("inst-a", 0, "LocalCPUBackend")] == 0


def test_lookup_credits_an_instance_with_the_shortest_prefix_of_its_ranks(
    controller: ControllerRunner, make_instance
) -> None:
    two_ranks(make_instance, "tp", PROMPT, PROMPT[:4])
    wait_for(lambda: controller.lookup(PROMPT) == {"tp": ["LocalCPUBackend", 4]}, what="min over ranks")
    response = controller.client.post("/clear", json={"instance_id": "tp", "location": "LocalCPUBackend"})
    assert response.status_code == 200
    body = response.json()
    assert body["num_tokens"] == 16
    assert body["num_tokens_per_worker"] == {"0": 12, "1": 4}


def test_lookup_counts_a_prefix_held_partly_on_each_location_and_names_the_one_holding_most(
    controller: ControllerRunner, make_instance
) -> None:
    inst = make_instance("split")
    inst.store(PROMPT)
    inst.sync()
    wait_for(lambda: controller.lookup(PROMPT) == {"split": ["LocalCPUBackend", 12]}, what="credited")
    # drop the first chunk from CPU only: disk holds all 3, CPU 2 of them
    cpu = inst.engine.backend("LocalCPUBackend")
    first = inst.engine.keys.key(inst.engine.hasher.hashes(PROMPT)[0])
    assert cpu.remove(first) == 4
    inst.sync()
    wait_for(lambda: controller.lookup(PROMPT) == {"split": ["LocalDiskBackend", 12]}, what="disk holds most")
