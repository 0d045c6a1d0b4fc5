"""Two real vLLM instances (CPU) without a shared disk: B takes A's prompt KV over the peer channel.

A controller (real process) on a real nats-server; each instance's YAML uses LMCache's keys
(``controller_pull_url``, ``lmcache_worker_ports``, ``p2p_host``, ``p2p_init_ports``,
``enable_p2p``). A serves a ~2,000-token prompt; once the controller credits A with it, B serves
the same prompt: its scheduler's lookup misses locally, asks the controller who holds the prefix,
fetches the chunks from A, and counts them as external hits. The tiny Llama has random,
well-scaled weights, so equal greedy outputs mean the KV that came from A was right.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from lmcache_connector_vllm.demo import poll_until
from lmcache_core.controller.cli import read_ready_line
from lmcache_core.testing import free_port

from vllm_helpers import VllmProcess, make_prompt, stop_process, write_config

START_TIMEOUT = 420.0
SECRET = "p2p-test-secret"


def test_b_serves_a_prompt_with_external_hits_fetched_from_a_and_the_same_output(
    tmp_path: Path, tiny_model: Path, nats_url: str
) -> None:
    controller = subprocess.Popen(
        [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
         "--nats-url", nats_url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
    prompt = make_prompt(11, length=2000)
    a_done, go, b_done, stop = tmp_path / "a_done", tmp_path / "go", tmp_path / "b_done", tmp_path / "stop"
    model = {"model": str(tiny_model), "connector": "plugin", "enable_prefix_caching": False}
    a = b = None
    try:
        ready = read_ready_line(controller, "lmcache_controller", 60)
        api = httpx.Client(base_url=ready["http"], timeout=30.0)
        a = VllmProcess(
            {**model, "steps": [
                {"prompt": prompt, "max_tokens": 8},
                {"touch": str(a_done)},
                {"wait_for_file": str(stop), "timeout": START_TIMEOUT},
            ]},
            tmp_path, configs["A"], "A",
        )
        b = VllmProcess(
            {**model, "steps": [
                {"wait_for_file": str(go), "timeout": START_TIMEOUT},
                {"prompt": prompt, "max_tokens": 8},
                {"prompt": prompt, "max_tokens": 8},  # again: now from B's own CPU tier
                {"touch": str(b_done)},
                {"wait_for_file": str(stop), "timeout": START_TIMEOUT},
            ]},
            tmp_path, configs["B"], "B",
        )

        def running(done: Path) -> bool:
            for run in (a, b):
                assert run.proc.poll() is None, run.log_file.read_text(errors="replace")[-4000:]
            return done.exists()

        poll_until(lambda: running(a_done), bool, START_TIMEOUT, "instance A serving its prompt")
        credited = poll_until(
            lambda: api.post("/lookup", json={"tokens": prompt}).json()["layout_info"],
            lambda layout: layout.get("A", [None, 0])[1] == len(prompt), 60, "the controller crediting A",
        )
        assert "B" not in credited  # B has nothing of it: no shared disk
        b_info = poll_until(  # B's vLLM registers once its engine is up
            lambda: api.post("/query_worker_info", json={"instance_id": "B"}),
            lambda response: response.status_code == 200, START_TIMEOUT, "instance B registering",
        )
        assert b_info.json()["worker_infos"][0]["peer_init_url"] == f"127.0.0.1:{ports['B']}"
        go.touch()
        poll_until(lambda: running(b_done), bool, START_TIMEOUT, "instance B serving the prompt")
        # what B fetched is in its own tiers now, and their admits credit it
        poll_until(
            lambda: api.post("/lookup", json={"tokens": prompt}).json()["layout_info"],
            lambda layout: layout.get("B", [None, 0])[1] == len(prompt), 60, "the controller crediting B",
        )
        stop.touch()
        b_run = b.finish()
        a_run = a.finish()
    finally:
        for run in (a, b):
            if run is not None and run.proc.poll() is None:
                run.proc.kill()
        stop_process(controller)
    (computed,) = a_run.outputs
    fetched, local = b_run.outputs
    assert computed["num_cached_tokens"] == 0
    assert fetched["num_cached_tokens"] == len(prompt) - 1
    assert fetched["token_ids"] == computed["token_ids"]
    assert local["num_cached_tokens"] == len(prompt) - 1 and local["token_ids"] == computed["token_ids"]
    assert b_run.log.count(" from peer A/0 ") == 1  # the repeat was a local hit
    # B's log names A as the source of the bytes
    line = re.search(
        rf"fetched {len(prompt)} tokens \((\d+) bytes\) from peer A/0 at 127\.0\.0\.1:{ports['A']}", b_run.log
    )
    assert line is not None, b_run.log[-4000:]
    nbytes = int(line.group(1))
    assert nbytes > 0
    print(
        f"B fetched {nbytes} bytes from A; generate of {len(prompt)} tokens: A cold {computed['seconds']:.2f} s, "
        f"B warm from A {fetched['seconds']:.2f} s, B warm from its CPU tier {local['seconds']:.2f} s"
    )
