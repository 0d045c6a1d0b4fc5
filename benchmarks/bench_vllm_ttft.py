"""Time to first token with the lmcache connector in a real vLLM on CPU: cold, warm from CPU, warm from disk, and the cost of saving.

    .venv/bin/python benchmarks/bench_vllm_ttft.py [--tokens 4096] [--layers 8] [--hidden 1024]

A dummy-weight Llama (8 layers, hidden 1024, 16 heads, 8 KV heads, bf16) where prefill
dominates. A baseline instance without the connector warms up and serves two long prompts.
Instance 1 (vLLM's own prefix cache off, so every hit comes from lmcache) warms up on a short
prompt, then serves the same two prompts cold (computed and stored in CPU and on disk: the cost
of saving is its TTFT over the baseline's), then both again (loaded from LocalCPUBackend: all
but the last token). Instance 2, a fresh process sharing the disk directory, warms up and
serves both prompts (loaded from LocalDiskBackend). TTFT is the wall time of ``generate`` with
``max_tokens=1``; each figure is the mean over the two prompts. Prints one line per case and a
JSON summary; exits 1 if the CPU speedup is below 10x or saving costs more than 1.10x.

``--codec zstd`` (any installed codec) adds instance 3: a CPU tier that stores chunks encoded
(``store_codecs: {LocalCPUBackend: zstd}``), serving both prompts cold then warm; its warm TTFT
is printed beside the uncompressed tier's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "plugins" / "connector_vllm" / "tests"
sys.path.insert(0, str(TESTS))

from vllm_runner import write_tiny_llama  # noqa: E402

RUNNER = TESTS / "vllm_runner.py"


def run_instance(job: dict[str, Any], work: Path, config: Path, name: str) -> list[dict[str, Any]]:
    job = dict(job, result_file=str(work / f"{name}.json"))
    (work / f"{name}_job.json").write_text(json.dumps(job))
    env = dict(os.environ, LMCACHE_CONFIG_FILE=str(config), VLLM_CPU_KVCACHE_SPACE="2")
    with (work / f"{name}.log").open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), str(work / f"{name}_job.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600,
        )
    if proc.returncode != 0:
        tail = (work / f"{name}.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"bench_vllm_ttft: vLLM instance {name} failed:\n{tail}")
    return json.loads((work / f"{name}.json").read_text())["outputs"]


def bench_model(work: Path, layers: int, hidden: int, tokens: int) -> Path:
    """The dummy-weight Llama the TTFT benchmarks use (prefill dominates), under ``work``."""
    return write_tiny_llama(
        work / "model", layers=layers, hidden=hidden, heads=hidden // 64,
        kv_heads=hidden // 128, intermediate=hidden * 11 // 4, vocab=32000,
        max_position=2 * tokens, weights=False,
    )


def mean_seconds(outs: list[dict[str, Any]]) -> float:
    """Mean wall time of the ``generate`` calls in ``outs``."""
    return sum(o["seconds"] for o in outs) / len(outs)


def bench_setup(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, list[list[int]], random.Random]:
    """The TTFT benchmarks' options (``--tokens``, ``--layers``, ``--hidden``), their two long
    prompts, and the seeded generator that made them (for warm-up prompts)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--codec", help="also time warm loads from a CPU tier encoded with this codec")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(args.tokens)] for _ in range(2)]
    return args, prompts, rng


def main(argv: list[str] | None = None) -> int:
    args, prompts, rng = bench_setup(__doc__.splitlines()[0], argv)
    warmup = [rng.randrange(3, 32000) for _ in range(200)]
    with tempfile.TemporaryDirectory(prefix="bench-vllm-ttft-") as tmp:
        work = Path(tmp)
        model = bench_model(work, args.layers, args.hidden, args.tokens)
        config = work / "lmcache.yaml"
        config.write_text(
            f"chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n"
            f"local_disk: {work / 'disk'}\nmax_local_disk_size: 2\n"
        )
        base = {
            "model": str(model), "load_format": "dummy", "dtype": "bfloat16",
            "connector": "module_path", "enable_prefix_caching": False,
            "max_model_len": 2 * args.tokens, "max_num_batched_tokens": 2 * args.tokens,
        }
        one = lambda p: {"prompt": p, "max_tokens": 1}  # noqa: E731
        started = time.perf_counter()
        plain = run_instance(
            {**base, "connector": None, "steps": [one(warmup)] + [one(p) for p in prompts]},
            work, config, "plain",
        )
        first = run_instance(
            {**base, "steps": [one(warmup)] + [one(p) for p in prompts] * 2}, work, config, "first"
        )
        second = run_instance(
            {**base, "steps": [one(warmup)] + [one(p) for p in prompts]}, work, config, "second"
        )
        encoded: list[dict[str, Any]] = []
        if args.codec:
            codec_config = work / "codec.yaml"
            codec_config.write_text(
                f"chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n"
                f"store_codecs: {{LocalCPUBackend: {args.codec}}}\n"
            )
            encoded = run_instance(
                {**base, "steps": [one(warmup)] + [one(p) for p in prompts] * 2}, work, codec_config, "codec"
            )[3:5]
        wall = time.perf_counter() - started

    mean = mean_seconds
    plain_cold, cold, cpu, disk = plain[1:3], first[1:3], first[3:5], second[1:3]
    for label, outs, expect_hit in (("cpu", cpu, True), ("disk", disk, True), ("cold", cold, False)):
        hits = [o["num_cached_tokens"] for o in outs]
        if expect_hit != all(h > 0 for h in hits) or (not expect_hit and any(hits)):
            raise SystemExit(f"bench_vllm_ttft: unexpected cache hits for {label}: {hits}")
    plain_s, cold_s, cpu_s, disk_s = mean(plain_cold), mean(cold), mean(cpu), mean(disk)
    summary = {
        "prompt_tokens": args.tokens,
        "cached_tokens": cpu[0]["num_cached_tokens"],
        "model": f"llama {args.layers} layers, hidden {args.hidden}, bf16, dummy weights",
        "ttft_cold_without_connector_s": round(plain_s, 4),
        "ttft_cold_s": round(cold_s, 4),
        "save_cost": round(cold_s / plain_s, 3),
        "ttft_warm_cpu_s": round(cpu_s, 4),
        "ttft_warm_disk_s": round(disk_s, 4),
        "speedup_cpu": round(cold_s / cpu_s, 2),
        "speedup_disk": round(cold_s / disk_s, 2),
        "wall_s": round(wall, 1),
    }
    if encoded:
        if not all(o["num_cached_tokens"] > 0 for o in encoded):
            raise SystemExit(f"bench_vllm_ttft: no cache hits from the {args.codec} tier")
        summary[f"ttft_warm_cpu_{args.codec}_s"] = round(mean(encoded), 4)
        summary[f"warm_{args.codec}_vs_uncompressed"] = round(mean(encoded) / cpu_s, 3)
    print(f"TTFT, {args.tokens}-token prompt ({summary['model']}), mean of 2 prompts:")
    print(f"  cold, vLLM without the connector    {plain_s:8.3f} s")
    print(f"  cold (computed, then stored)        {cold_s:8.3f} s   {cold_s / plain_s:6.3f}x the cost without")
    print(f"  warm from LocalCPUBackend           {cpu_s:8.3f} s   {cold_s / cpu_s:6.1f}x faster")
    print(f"  warm from LocalDiskBackend (new vLLM) {disk_s:6.3f} s   {cold_s / disk_s:6.1f}x faster")
    if encoded:
        enc_s = mean(encoded)
        print(f"  warm from LocalCPUBackend, {args.codec:<6}    {enc_s:8.3f} s   {cold_s / enc_s:6.1f}x faster, "
              f"{enc_s / cpu_s:.2f}x the uncompressed tier's TTFT")
    print(json.dumps(summary))
    return 0 if summary["speedup_cpu"] >= 10 and summary["save_cost"] <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
