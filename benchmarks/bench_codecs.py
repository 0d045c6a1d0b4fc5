"""Chunk codecs: compression ratio and encode/decode speed, against ``copy_`` of the same bytes.

    .venv/bin/python benchmarks/bench_codecs.py [--kv-dir DIR | --no-vllm] [--chunk-mib 32]

Two kinds of data, every installed codec (``lmcache plugins`` lists them):

* real KV: the chunks a real vLLM (the tiny 2-layer Llama of the connector tests, random
  well-scaled weights, bfloat16) stores for a 2,048-token prompt, read back from its disk tier
  (``--kv-dir`` reads the ``*.kvchunk`` files of a directory instead; ``--no-vllm`` skips it);
* random normal bfloat16, one chunk of ``--chunk-mib`` MiB shaped like Llama-8B's canonical chunk
  ``[layers, tokens, 2 * 8 heads * 128]``.

Ratio is raw bytes over payload bytes. Encode and decode speeds are GB/s of raw (decoded)
bytes, the best of several rounds; the baseline is ``dst.copy_(src)`` of the same bytes into a
preallocated tensor, measured in the same run. Prints a table and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_core.codecs import CodecSpec, decode_chunk, encode_chunk
from lmcache_core.plugins import codec_specs, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "plugins" / "connector_vllm" / "tests"


def best_seconds(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def capture_real_kv(work: Path) -> Path:
    """Run the tiny vLLM once with a disk tier; the directory of its chunk files."""
    sys.path.insert(0, str(TESTS))
    from vllm_helpers import run_vllm, write_config
    from vllm_runner import write_tiny_llama

    model = write_tiny_llama(work / "model")
    disk = work / "disk"
    config = write_config(
        work / "lmcache.yaml", chunk_size=256, max_local_cpu_size=0.5, local_disk=str(disk), max_local_disk_size=1.0
    )
    rng = random.Random(0)
    prompt = [rng.randrange(3, 1000) for _ in range(2048)]
    job = {"model": str(model), "dtype": "bfloat16", "connector": "plugin", "enable_prefix_caching": False,
           "steps": [{"prompt": prompt, "max_tokens": 1}]}
    run_vllm(job, work, config, "capture")
    return disk


def read_chunks(directory: Path, specs: dict[str, CodecSpec]) -> list[torch.Tensor]:
    from lmcache_backend_disk.chunkfile import read_chunk, read_header

    chunks = []
    for path in sorted(directory.rglob("*.kvchunk")):
        with path.open("rb", buffering=0) as f:
            key = read_header(f, os.fstat(f.fileno()).st_size).key
            f.seek(0)
            tensor, header = read_chunk(f, key)
        if header.encoding is not None:
            tensor = decode_chunk(specs[header.encoding.codec], tensor, header.encoding)
        chunks.append(tensor)
    if not chunks:
        raise SystemExit(f"bench_codecs: no *.kvchunk files under {directory}")
    return chunks


def measure(chunks: list[torch.Tensor], spec: CodecSpec, rounds: int) -> dict[str, float]:
    raw_bytes = sum(c.numel() * c.element_size() for c in chunks)
    encoded = [encode_chunk(spec, c) for c in chunks]
    payload_bytes = sum(p.numel() for p, _ in encoded)
    dsts = [torch.empty_like(c) for c in chunks]

    def copy_all() -> None:
        for d, c in zip(dsts, chunks):
            d.copy_(c)

    copy_s = best_seconds(copy_all, rounds)
    encode_s = best_seconds(lambda: [encode_chunk(spec, c) for c in chunks], rounds)
    decode_s = best_seconds(lambda: [decode_chunk(spec, p, e) for p, e in encoded], rounds)
    return {
        "ratio": round(raw_bytes / payload_bytes, 3),
        "encode_gbps": round(raw_bytes / encode_s / 1e9, 3),
        "decode_gbps": round(raw_bytes / decode_s / 1e9, 3),
        "copy_gbps": round(raw_bytes / copy_s / 1e9, 3),
        "encode_vs_copy": round(copy_s / encode_s, 4),
        "decode_vs_copy": round(copy_s / decode_s, 4),
        "mib": round(raw_bytes / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-dir", type=Path, help="read real KV from the *.kvchunk files here")
    parser.add_argument("--no-vllm", action="store_true", help="skip the real-KV data set")
    parser.add_argument("--chunk-mib", type=int, default=32, help="size of the random bf16 chunk")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the best counts)")
    args = parser.parse_args(argv)

    specs = codec_specs(get_plugin_manager())
    if not specs:
        raise SystemExit("bench_codecs: no codec installed (pip install -e plugins/codecs)")
    torch.manual_seed(0)
    tokens = 256
    layers = max(1, args.chunk_mib * 2**20 // (tokens * 2048 * 2))
    data: dict[str, list[torch.Tensor]] = {
        "random normal bf16": [torch.randn(layers, tokens, 2048).to(torch.bfloat16)]
    }
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        if args.kv_dir is not None:
            data["real KV"] = read_chunks(args.kv_dir, specs)
        elif not args.no_vllm:
            data["real KV (tiny vLLM, bf16)"] = read_chunks(capture_real_kv(Path(tmp)), specs)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    print(f"threads: {torch.get_num_threads()}")
    for label, chunks in data.items():
        shapes = sorted({tuple(c.shape) for c in chunks})
        print(f"\n{label}: {len(chunks)} chunk(s) of shape {shapes[0]}{' ...' if len(shapes) > 1 else ''}")
        print(f"  {'codec':<6} {'ratio':>7} {'encode GB/s':>12} {'decode GB/s':>12} {'copy_ GB/s':>11}"
              f" {'enc/copy':>9} {'dec/copy':>9}")
        summary[label] = {}
        for name, spec in specs.items():
            m = measure(chunks, spec, args.rounds)
            summary[label][name] = m
            print(f"  {name:<6} {m['ratio']:>6.2f}x {m['encode_gbps']:>12.2f} {m['decode_gbps']:>12.2f}"
                  f" {m['copy_gbps']:>11.2f} {m['encode_vs_copy']:>9.3f} {m['decode_vs_copy']:>9.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
