"""Many clients at once: clears and lookups racing with instances that keep storing."""

from __future__ import annotations

import random
import threading
import time

import anyio
import httpx
import pytest

from .support import PROMPT, ControllerRunner, wait_for

pytestmark = pytest.mark.timeout(120)

CLIENTS = 32
DURATION = 8.0  # seconds of mixed load (bounded loop: each client stops at the deadline)
LOCATIONS = ["LocalCPUBackend", "LocalDiskBackend"]


def test_32_clients_mixing_clear_and_lookup_get_no_errors_and_the_index_ends_equal_to_the_workers(
    controller: ControllerRunner, make_instance
) -> None:
    instances = [make_instance(f"inst-{i}") for i in range(3)]
    for inst in instances:
        inst.store(PROMPT)
        inst.sync()
    wait_for(lambda: len(controller.lookup(PROMPT)) == 3, what="all instances credited")

    stop = threading.Event()

    def keep_storing(inst, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            inst.store(PROMPT if rng.random() < 0.5 else [rng.randrange(50_000) for _ in range(16)], seed=seed)

    writers = [threading.Thread(target=keep_storing, args=(inst, i), daemon=True) for i, inst in enumerate(instances)]
    for writer in writers:
        writer.start()

    statuses: dict[int, int] = {}
    bad: list[str] = []
    counts = {"clear": 0, "lookup": 0}

    async def client(n: int, http: httpx.AsyncClient, deadline: float) -> None:
        rng = random.Random(n)
        while time.monotonic() < deadline:
            if rng.random() < 0.3:
                body = {"instance_id": f"inst-{rng.randrange(3)}", "location": rng.choice(LOCATIONS)}
                response = await http.post("/clear", json=body)
                counts["clear"] += 1
                if response.status_code == 200 and response.json()["num_tokens"] < 0:
                    bad.append(response.text)
            else:
                response = await http.post("/lookup", json={"tokens": PROMPT})
                counts["lookup"] += 1
                if response.status_code == 200:
                    for location, tokens in response.json()["layout_info"].values():
                        if location not in LOCATIONS or not 0 < tokens <= len(PROMPT):
                            bad.append(response.text)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code != 200:
                bad.append(f"{response.status_code} {response.text}")

    async def load() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=controller.url, timeout=30, limits=limits) as http:
            deadline = time.monotonic() + DURATION
            with anyio.fail_after(DURATION + 60):  # no deadlock: the load ends in bounded time
                async with anyio.create_task_group() as tg:
                    for n in range(CLIENTS):
                        tg.start_soon(client, n, http, deadline)

    try:
        anyio.run(load)
    finally:
        stop.set()
        for writer in writers:
            writer.join(30)
    assert not bad, bad[:5]
    assert statuses == {200: counts["clear"] + counts["lookup"]}
    assert counts["clear"] > 10 and counts["lookup"] > 10, counts

    for inst in instances:
        inst.sync()
    expected: dict = {}
    for inst in instances:
        expected.update(inst.inventory_counts())
    wait_for(lambda: controller.holder_counts() == expected, what="index equals the workers' inventories")
