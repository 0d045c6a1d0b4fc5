"""Two real vLLM instances (CPU) without a shared disk: B takes A's prompt KV over the peer channel.

A controller (real process) on a real nats-server; each instance's YAML uses LMCache's keys
(``controller_pull_url``, ``lmcache_worker_ports``, ``p2p_host``, ``p2p_init_ports``,
``enable_p2p``). A serves a ~2,000-token prompt; once the controller credits A with it, B serves
the same prompt: its scheduler's lookup misses locally, asks the controller who holds the prefix,
fetches the chunks from A, and counts them as external hits. The tiny Llama has random,
well-scaled weights, so equal greedy outputs mean the KV that came from A was right. With A
killed (no goodbye: the controller still names it), B's fetch meets a dead peer and B computes
the prompt, with the same output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lmcache_connector_vllm.demo import poll_until
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.testing import free_port

from vllm_helpers import VllmProcess, make_prompt, stop_process, write_config

START_TIMEOUT = 420.0
SECRET = "p2p-test-secret"
PROMPT = make_prompt(11, length=2000)


@dataclass
class TwoInstances:
    computed: dict[str, Any]  # A's run of the prompt
    fetched: dict[str, Any]  # B's first run of it
    local: dict[str, Any]  # B's second run of it
    b_log: str
    a_peer_url: str


def run_a_then_b(tmp_path: Path, model_path: Path, nats_url: str, *, kill_a: bool) -> TwoInstances:
    """A serves the prompt; once the controller credits A (and, with ``kill_a``, once A is killed
    while the controller still credits it), B serves it twice."""
    controller = subprocess.Popen(
        [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
         "--nats-url", nats_url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a killed A stays credited: B's fetch then meets a dead peer, not an empty answer
        env={**os.environ, "LMCACHE_CONTROLLER_HEARTBEAT_TIMEOUT": "600"} if kill_a else None,
    )
    ports = {"A": free_port(), "B": free_port()}
    configs = {
        name: write_config(
            tmp_path / f"{name}.yaml", chunk_size=256, local_cpu=True, max_local_cpu_size=0.25,
            enable_controller=True, lmcache_instance_id=name, controller_pull_url=nats_url,
            lmcache_worker_ports=[8001], p2p_host="127.0.0.1", p2p_init_ports=[ports[name]],
            enable_p2p=True, p2p_secret=SECRET,
        )
        for name in ("A", "B")
    }
    a_done, go, b_done, stop = tmp_path / "a_done", tmp_path / "go", tmp_path / "b_done", tmp_path / "stop"
    model = {"model": str(model_path), "connector": "plugin", "enable_prefix_caching": False}
    a = b = None
    try:
        ready = read_ready_line(controller, "lmcache_controller", 60)
        api = httpx.Client(base_url=ready["http"], timeout=30.0)
        a = VllmProcess(
            {**model, "steps": [
                {"prompt": PROMPT, "max_tokens": 8},
                {"touch": str(a_done)},
                {"wait_for_file": str(stop), "timeout": START_TIMEOUT},
            ]},
            tmp_path, configs["A"], "A",
        )
        b = VllmProcess(
            {**model, "steps": [
                {"wait_for_file": str(go), "timeout": START_TIMEOUT},
                {"prompt": PROMPT, "max_tokens": 8},
                {"prompt": PROMPT, "max_tokens": 8},  # again: now from B's own CPU tier
                {"touch": str(b_done)},
                {"wait_for_file": str(stop), "timeout": START_TIMEOUT},
            ]},
            tmp_path, configs["B"], "B",
        )

        def running(done: Path, *runs: VllmProcess) -> bool:
            for run in runs:
                assert run.proc.poll() is None, run.log_file.read_text(errors="replace")[-4000:]
            return done.exists()

        poll_until(lambda: running(a_done, a, b), bool, START_TIMEOUT, "instance A serving its prompt")
        credited = poll_until(
            lambda: api.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"],
            lambda layout: layout.get("A", [None, 0])[1] == len(PROMPT), 60, "the controller crediting A",
        )
        assert "B" not in credited  # B has nothing of it: no shared disk
        b_info = poll_until(  # B's vLLM registers once its engine is up
            lambda: api.post("/query_worker_info", json={"instance_id": "B"}),
            lambda response: response.status_code == 200, START_TIMEOUT, "instance B registering",
        )
        assert b_info.json()["worker_infos"][0]["peer_init_url"] == f"127.0.0.1:{ports['B']}"
        computed = json.loads(Path(a.job["result_file"]).read_text())["outputs"][0]
        if kill_a:
            os.killpg(a.proc.pid, signal.SIGKILL)  # A and its engine process, with no goodbye
            a.proc.wait(30)
        go.touch()
        poll_until(lambda: running(b_done, b), bool, START_TIMEOUT, "instance B serving the prompt")
        # what B fetched (or computed) is in its own tiers now, and their admits credit it
        poll_until(
            lambda: api.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"],
            lambda layout: layout.get("B", [None, 0])[1] == len(PROMPT), 60, "the controller crediting B",
        )
        stop.touch()
        b_run = b.finish()
        if not kill_a:
            a.finish()
    finally:
        for run in (a, b):
            if run is not None and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
        stop_process(controller)
    fetched, local = b_run.outputs
    return TwoInstances(computed, fetched, local, b_run.log, f"127.0.0.1:{ports['A']}")


def test_b_serves_a_prompt_with_external_hits_fetched_from_a_and_the_same_output(
    tmp_path: Path, tiny_model: Path, nats_url: str
) -> None:
    run = run_a_then_b(tmp_path, tiny_model, nats_url, kill_a=False)
    assert run.computed["num_cached_tokens"] == 0
    assert run.fetched["num_cached_tokens"] == len(PROMPT) - 1
    assert run.fetched["token_ids"] == run.computed["token_ids"]
    assert run.local["num_cached_tokens"] == len(PROMPT) - 1 and run.local["token_ids"] == run.computed["token_ids"]
    # B's log names A as the source of the bytes, once: the repeat was a local hit
    line = re.search(
        rf"fetched {len(PROMPT)} tokens \((\d+) bytes\) from peer A/0 at {re.escape(run.a_peer_url)}", run.b_log
    )
    assert line is not None, run.b_log[-4000:]
    nbytes = int(line.group(1))
    assert nbytes > 0 and run.b_log.count(" from peer A/0 ") == 1
    print(
        f"B fetched {nbytes} bytes from A; generate of {len(PROMPT)} tokens: A cold {run.computed['seconds']:.2f} s, "
        f"B warm from A {run.fetched['seconds']:.2f} s, B warm from its CPU tier {run.local['seconds']:.2f} s"
    )


def test_a_dead_peer_costs_b_a_recompute_with_the_same_output(tmp_path: Path, tiny_model: Path, nats_url: str) -> None:
    run = run_a_then_b(tmp_path, tiny_model, nats_url, kill_a=True)
    assert run.fetched["num_cached_tokens"] == 0  # nothing came from the dead peer
    assert run.fetched["token_ids"] == run.computed["token_ids"]
    # its fetch met the dead peer (refused, or reset by a socket the kill left behind)
    assert re.search(
        rf"fetched 0 tokens \(0 bytes\) from peer A/0 at {re.escape(run.a_peer_url)} in [\d.]+ s \(stopped: .*; the rest is computed\)",
        run.b_log,
    ), run.b_log[-4000:]
    # B computed and stored it: its repeat is a local hit with the same output
    assert run.local["num_cached_tokens"] == len(PROMPT) - 1 and run.local["token_ids"] == run.computed["token_ids"]
