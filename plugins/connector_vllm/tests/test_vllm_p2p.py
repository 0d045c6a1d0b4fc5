"""Two real vLLM instances (CPU) without a shared disk: B takes A's prompt KV over the peer channel.

A controller (real process) on a real nats-server; each instance's YAML uses LMCache's keys
(``controller_pull_url``, ``lmcache_worker_ports``, ``p2p_host``, ``p2p_init_ports``,
``enable_p2p``). A serves two ~2,000-token prompts; once the controller credits A with them, B
serves each twice: its scheduler's lookup misses locally, asks the controller who holds the
prefix, fetches the chunks from A, and counts them as external hits. The tiny Llama has random,
well-scaled weights, so equal greedy outputs mean the KV that came from A was right.

A advertises ``p2p_advertise_host`` 127.0.0.2, where a real TCP proxy forwards B's connection to
it (same port). For the first prompt it forwards everything. For the second it stalls in the
middle of the third chunk and A is killed there (no goodbye: the controller still names A): B
keeps the whole, checked chunks it got, computes the rest, and answers the same.

Both cases share one pair of processes (starting vLLM dominates the runtime).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmcache_connector_vllm.demo import poll_until
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.testing import Proxy, free_port, running_nats_server

from vllm_helpers import VllmProcess, make_prompt, stop_process, write_config

START_TIMEOUT = 420.0
SECRET = "p2p-test-secret"
WHOLE = make_prompt(11, length=2000)  # fetched whole from A
CUT = make_prompt(12, length=2000)  # A dies while B fetches it
#: the tiny Llama's chunk: 2 layers x (K, V) x 256 tokens x 2 KV heads x 64, float32
CHUNK_BYTES = 2 * 2 * 256 * 2 * 64 * 4


@dataclass
class Runs:
    computed: dict[str, dict[str, Any]]  # A's run of each prompt
    fetched: dict[str, dict[str, Any]]  # B's first run of each (from A, whole or cut)
    local: dict[str, dict[str, Any]]  # B's second run of each (from its own CPU tier)
    b_log: str
    a_peer_url: str  # where B was told A is (the proxy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Runs]:
    with running_nats_server() as server:
        yield run_a_then_b(tmp_path_factory.mktemp("p2p"), tiny_model, server.url)


def run_a_then_b(tmp_path: Path, model_path: Path, nats_url: str) -> Runs:
    """A serves both prompts; once the controller credits A, B serves WHOLE twice through a
    proxy that forwards everything, then CUT twice through one that stalls mid-transfer, where
    A is killed."""
    controller = subprocess.Popen(
        [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
         "--nats-url", nats_url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a killed A stays credited: B's fetch then meets a dead peer, not an empty answer
        env={**os.environ, "LMCACHE_CONTROLLER_HEARTBEAT_TIMEOUT": "600"},
    )
    ports = {"A": free_port(), "B": free_port()}
    configs = {
        name: write_config(
            tmp_path / f"{name}.yaml", chunk_size=256, local_cpu=True, max_local_cpu_size=0.25,
            enable_controller=True, lmcache_instance_id=name, controller_pull_url=nats_url,
            lmcache_worker_ports=[8001], p2p_host="127.0.0.1", p2p_init_ports=[ports[name]],
            enable_p2p=True, p2p_secret=SECRET,
            **({"p2p_advertise_host": "127.0.0.2"} if name == "A" else {}),
        )
        for name in ("A", "B")
    }
    flags = {name: tmp_path / name for name in ("a_done", "go_whole", "b_whole", "go_cut", "b_cut", "stop")}
    model = {"model": str(model_path), "connector": "plugin", "enable_prefix_caching": False}
    wait = lambda flag: {"wait_for_file": str(flags[flag]), "timeout": START_TIMEOUT}  # noqa: E731
    a = b = proxy = None
    try:
        ready = read_ready_line(controller, "lmcache_controller", 60)
        api = httpx.Client(base_url=ready["http"], timeout=30.0)
        a = VllmProcess(
            {**model, "steps": [
                {"prompt": WHOLE, "max_tokens": 8},
                {"prompt": CUT, "max_tokens": 8},
                {"touch": str(flags["a_done"])},
                wait("stop"),
            ]},
            tmp_path, configs["A"], "A",
        )
        b = VllmProcess(
            {**model, "steps": [
                wait("go_whole"),
                {"prompt": WHOLE, "max_tokens": 8},
                {"prompt": WHOLE, "max_tokens": 8},  # again: now from B's own CPU tier
                {"touch": str(flags["b_whole"])},
                wait("go_cut"),
                {"prompt": CUT, "max_tokens": 8},
                {"prompt": CUT, "max_tokens": 8},
                {"touch": str(flags["b_cut"])},
                wait("stop"),
            ]},
            tmp_path, configs["B"], "B",
        )

        def running(done: str, *runs: VllmProcess) -> bool:
            for run in runs:
                assert run.proc.poll() is None, run.log_file.read_text(errors="replace")[-4000:]
            return flags[done].exists()

        def credited(name: str, prompt: list[int], what: str) -> dict[str, Any]:
            return poll_until(
                lambda: api.post("/lookup", json={"tokens": prompt}).json()["layout_info"],
                lambda layout: layout.get(name, [None, 0])[1] == len(prompt), 60, what,
            )

        poll_until(lambda: running("a_done", a, b), bool, START_TIMEOUT, "instance A serving its prompts")
        for prompt in (WHOLE, CUT):
            assert "B" not in credited("A", prompt, "the controller crediting A")  # no shared disk
        b_info = poll_until(  # B's vLLM registers once its engine is up
            lambda: api.post("/query_worker_info", json={"instance_id": "B"}),
            lambda response: response.status_code == 200, START_TIMEOUT, "instance B registering",
        )
        assert b_info.json()["worker_infos"][0]["peer_init_url"] == f"127.0.0.1:{ports['B']}"
        a_url = api.post("/query_worker_info", json={"instance_id": "A"}).json()["worker_infos"][0]["peer_init_url"]
        assert a_url == f"127.0.0.2:{ports['A']}"
        computed = json.loads(Path(a.job["result_file"]).read_text())["outputs"]
        target, listen = f"127.0.0.1:{ports['A']}", ("127.0.0.2", ports["A"])

        proxy = Proxy(target, listen=listen)
        flags["go_whole"].touch()
        poll_until(lambda: running("b_whole", a, b), bool, START_TIMEOUT, "instance B serving WHOLE")
        credited("B", WHOLE, "the controller crediting B with WHOLE")
        proxy.cut()

        proxy = Proxy(target, listen=listen, stall_after=int(2.5 * CHUNK_BYTES))
        flags["go_cut"].touch()
        poll_until(lambda: running("b_whole", b) and proxy.stalled.is_set(), bool, START_TIMEOUT, "B's fetch of CUT")
        os.killpg(a.proc.pid, signal.SIGKILL)  # A and its engine process, mid-transfer, no goodbye
        a.proc.wait(30)
        proxy.cut()
        poll_until(lambda: running("b_cut", b), bool, START_TIMEOUT, "instance B serving CUT")
        # what B fetched and computed is in its own tiers now, and their admits credit it
        credited("B", CUT, "the controller crediting B with CUT")
        flags["stop"].touch()
        b_run = b.finish()
    finally:
        if proxy is not None:
            proxy.cut()
        for run in (a, b):
            if run is not None and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
        stop_process(controller)
    whole, whole_again, cut, cut_again = b_run.outputs
    return Runs(
        {"whole": computed[0], "cut": computed[1]},
        {"whole": whole, "cut": cut},
        {"whole": whole_again, "cut": cut_again},
        b_run.log,
        a_url,
    )


def test_b_serves_a_prompt_with_external_hits_fetched_from_a_and_the_same_output(runs: Runs) -> None:
    computed, fetched, local = runs.computed["whole"], runs.fetched["whole"], runs.local["whole"]
    assert computed["num_cached_tokens"] == 0
    assert fetched["num_cached_tokens"] == len(WHOLE) - 1
    assert fetched["token_ids"] == computed["token_ids"]
    assert local["num_cached_tokens"] == len(WHOLE) - 1 and local["token_ids"] == computed["token_ids"]
    # B's log names A as the source of the bytes, once: the repeat was a local hit
    line = re.search(
        rf"fetched {len(WHOLE)} tokens \((\d+) bytes\) from peer A/0 at {re.escape(runs.a_peer_url)} in [\d.]+ s$",
        runs.b_log, re.MULTILINE,
    )
    assert line is not None, runs.b_log[-4000:]
    nbytes = int(line.group(1))
    assert nbytes == len(WHOLE) * CHUNK_BYTES // 256  # every token's KV, once
    assert runs.b_log.count(" from peer A/0 ") == 2  # this fetch and the cut one
    print(
        f"B fetched {nbytes} bytes from A; generate of {len(WHOLE)} tokens: A cold {computed['seconds']:.2f} s, "
        f"B warm from A {fetched['seconds']:.2f} s, B warm from its CPU tier {local['seconds']:.2f} s"
    )


def test_a_peer_killed_mid_transfer_costs_b_a_recompute_of_the_rest_with_the_same_output(runs: Runs) -> None:
    computed, fetched, local = runs.computed["cut"], runs.fetched["cut"], runs.local["cut"]
    # B kept the whole chunks that came before the kill (two; the third was cut) and computed
    # the rest: those two are its external hits, and the output is A's
    line = re.search(
        rf"fetched (\d+) tokens \((\d+) bytes\) from peer A/0 at {re.escape(runs.a_peer_url)} in [\d.]+ s "
        r"\(stopped: .*; the rest is computed\)",
        runs.b_log,
    )
    assert line is not None, runs.b_log[-4000:]
    assert (int(line.group(1)), int(line.group(2))) == (2 * 256, 2 * CHUNK_BYTES)
    assert fetched["num_cached_tokens"] == 2 * 256
    assert fetched["token_ids"] == computed["token_ids"]
    # B stored what it computed: its repeat is a local hit with the same output
    assert local["num_cached_tokens"] == len(CUT) - 1 and local["token_ids"] == computed["token_ids"]
