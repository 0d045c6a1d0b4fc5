"""Time to first token on instance B: cold vs warm from peer A over the peer channel vs warm from B's own CPU tier.

    .venv/bin/python benchmarks/bench_vllm_p2p_ttft.py [--tokens 4096] [--layers 8] [--hidden 1024]

The dummy-weight Llama of ``bench_vllm_ttft.py`` (8 layers, hidden 1024, bf16) and a controller
with its embedded nats-server. Instance A (``enable_p2p``, no disk) warms up, then serves two
long prompts cold (computed and stored). Once the controller credits A with both, instance B (a
separate vLLM, no shared disk) warms up, serves both prompts (its scheduler's lookup fetches
them from A: warm from the peer), then both again (warm from its own CPU tier). TTFT is the wall
time of ``generate`` with ``max_tokens=1``; each figure is the mean over the two prompts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "plugins" / "connector_vllm" / "tests"
sys.path.insert(0, str(TESTS))

from bench_vllm_ttft import bench_model, bench_setup, mean_seconds  # noqa: E402
from vllm_helpers import VllmProcess, write_config  # noqa: E402

from lmcache_connector_vllm.demo import poll_until, stop_process  # noqa: E402
from lmcache_core.controller.cli import read_ready_line  # noqa: E402
from lmcache_core.testing import free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, prompts, rng = bench_setup(__doc__.splitlines()[0], argv)
    warmups = {name: [rng.randrange(3, 32000) for _ in range(200)] for name in ("A", "B")}
    one = lambda p: {"prompt": p, "max_tokens": 1}  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-vllm-p2p-") as tmp:
        work = Path(tmp)
        model = bench_model(work, args.layers, args.hidden, args.tokens)
        controller = subprocess.Popen(
            [sys.executable, "-m", "lmcache_core.controller.cli", "--host", "127.0.0.1", "--port", "0",
             "--monitor-port", str(free_port()), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        a = None
        try:
            ready = read_ready_line(controller, "lmcache_controller", 60)
            api = httpx.Client(base_url=ready["http"], timeout=30.0)
            configs = {
                name: write_config(
                    work / f"{name}.yaml", chunk_size=256, local_cpu=True, max_local_cpu_size=1,
                    enable_controller=True, lmcache_instance_id=name, controller_pull_url=ready["bus"],
                    p2p_host="127.0.0.1", p2p_init_ports=[free_port()], enable_p2p=True,
                    p2p_secret="bench-secret", p2p_fetch_timeout=30.0,
                )
                for name in ("A", "B")
            }
            base = {
                "model": str(model), "load_format": "dummy", "dtype": "bfloat16", "connector": "plugin",
                "enable_prefix_caching": False, "max_model_len": 2 * args.tokens,
                "max_num_batched_tokens": 2 * args.tokens,
            }
            a_done, stop = work / "a_done", work / "stop"
            a = VllmProcess(
                {**base, "steps": [one(warmups["A"]), *map(one, prompts), {"touch": str(a_done)},
                                   {"wait_for_file": str(stop), "timeout": 1200}]},
                work, configs["A"], "A",
            )
            poll_until(lambda: a_done.exists() or a.proc.poll() is not None, bool, 900, "instance A")
            for prompt in prompts:
                poll_until(
                    lambda: api.post("/lookup", json={"tokens": prompt}).json()["layout_info"],
                    lambda layout: layout.get("A", [None, 0])[1] == len(prompt), 60, "the controller crediting A",
                )
            started = time.perf_counter()
            b_outputs = VllmProcess(
                {**base, "steps": [one(warmups["B"]), *map(one, prompts), *map(one, prompts)]},
                work, configs["B"], "B",
            ).finish(900).outputs
            wall = time.perf_counter() - started
            stop.touch()
            a_outputs = a.finish(120).outputs
        finally:
            if a is not None and a.proc.poll() is None:
                a.proc.kill()
            stop_process(controller)

    cold, from_peer, from_cpu = a_outputs[1:3], b_outputs[1:3], b_outputs[3:5]
    for label, outs in (("peer", from_peer), ("cpu", from_cpu)):
        if any(o["num_cached_tokens"] != args.tokens - 1 for o in outs):
            raise SystemExit(f"bench_vllm_p2p_ttft: unexpected hits warm from {label}: {[o['num_cached_tokens'] for o in outs]}")
    model_text = f"llama {args.layers} layers, hidden {args.hidden}, bf16, dummy weights"
    cold_s = mean_seconds(cold)
    rows = [
        ("ttft_cold_on_a_s", "cold (A computes and stores)", cold_s),
        ("ttft_b_warm_from_a_s", "B warm from A over the peer channel", mean_seconds(from_peer)),
        ("ttft_b_warm_from_own_cpu_s", "B warm from its own LocalCPUBackend", mean_seconds(from_cpu)),
    ]
    print(f"TTFT, {args.tokens}-token prompt ({model_text}), mean of 2 prompts:")
    for _, label, seconds in rows:
        print(f"  {label:<38} {seconds:8.3f} s   {cold_s / seconds:6.1f}x faster than cold")
    summary = {"prompt_tokens": args.tokens, "model": model_text, "b_wall_s": round(wall, 1)}
    summary.update({key: round(seconds, 4) for key, _, seconds in rows})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
