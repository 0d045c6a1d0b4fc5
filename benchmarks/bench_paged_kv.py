"""Moving chunks between vLLM's paged KV cache and canonical chunks, against plain copies.

    python benchmarks/bench_paged_kv.py [--layers 32] [--heads 8] [--head-size 128] [--device cuda]

A Llama-8B-shaped cache (32 layers, 8 KV heads of 128, bf16) in vLLM 0.32's layouts: LBNHC
(FlashAttention NHD, Triton), LBHNC (FlashAttention HND, FlashInfer), BLHNC (cross-layer), with
16-token blocks. One 256-token chunk is 32 MiB. For each layout it times

* store: ``PagedKV.gather`` of a chunk's tokens (blocks out of order, starting mid-block) into a
  preallocated chunk, plus on CUDA the copy into pinned host memory;
* load: on CUDA the copy from pinned host memory, then ``PagedKV.scatter`` into the blocks;

and, as the baseline measured in the same run, ``copy_`` of the same bytes between preallocated
buffers (host to host on CPU; device to pinned host and back on CUDA). Prints GB/s and the
ratio to the baseline (best of ``--repeat``). On CPU, where vLLM is installed, it also times the
CPU attention backend's own packed pages (measured with its writer, as the connector does).

Needs torch only: ``paged_kv.py`` is loaded from its file, so it runs on a GPU machine without
vLLM or lmcache installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "connector_vllm"


def load_paged_kv():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "paged_kv", PLUGIN / "lmcache_connector_vllm" / "paged_kv.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["paged_kv"] = module
    spec.loader.exec_module(module)
    return module


def best_seconds(fn: Callable[[], None], repeat: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(kv, device: torch.device, tokens: int, repeat: int, rotate: int = 8) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Store and load of chunks through ``kv`` vs copies of their bytes, in GB/s and ratios.

    Each timed round moves ``rotate`` chunks, each to or from other random blocks (starting
    mid-block) of the cache, and the baseline copies the same number of bytes to or from
    ``rotate`` other regions of one large buffer, so neither side is served from a warm cache.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = random.Random(0)
    bs = kv.block_size
    need = -(-(tokens + 5) // bs)
    slot_sets = [kv.slots(rng.sample(range(kv.num_slots // bs), need), 5, 5 + tokens) for _ in range(rotate)]
    fmt = kv.format
    chunk = torch.empty(fmt.shape(tokens), dtype=fmt.dtype, device=device)
    nbytes = chunk.numel() * chunk.element_size()
    # baseline memory, written once: untouched pages would be read from the kernel's zero page
    pool = torch.ones((rotate, *fmt.shape(tokens)), dtype=fmt.dtype, device=device)
    chunk.fill_(1)
    if device.type == "cuda":
        host = torch.ones(fmt.shape(tokens), dtype=fmt.dtype).pin_memory()

        def store() -> None:
            for slots in slot_sets:
                host.copy_(kv.gather(slots, out=chunk), non_blocking=True)

        def load() -> None:
            for slots in slot_sets:
                kv.scatter(host, slots)

        def base_store() -> None:
            for region in pool:
                host.copy_(region, non_blocking=True)

        def base_load() -> None:
            for region in pool:
                region.copy_(host, non_blocking=True)
    else:

        def store() -> None:
            for slots in slot_sets:
                kv.gather(slots, out=chunk)

        def load() -> None:
            for slots in slot_sets:
                kv.scatter(chunk, slots)

        def base_store() -> None:
            for region in pool:
                chunk.copy_(region)

        def base_load() -> None:
            for region in pool:
                region.copy_(chunk)

    out = {}
    moved = nbytes * rotate
    for name, fn, base in (("store", store, base_store), ("load", load, base_load)):
        t, b = best_seconds(fn, repeat, sync), best_seconds(base, repeat, sync)
        out[f"{name}_gbps"] = round(moved / t / 1e9, 2)
        out[f"{name}_baseline_gbps"] = round(moved / b / 1e9, 2)
        out[f"{name}_ratio"] = round(b / t, 2)
    if device.type == "cuda":  # the device-side part alone: gathers vs device copies
        t = best_seconds(lambda: [kv.gather(s, out=chunk) for s in slot_sets], repeat, sync)
        b = best_seconds(lambda: [chunk.copy_(region) for region in pool], repeat, sync)
        out["device_gather_gbps"] = round(moved / t / 1e9, 1)
        out["device_copy_gbps"] = round(moved / b / 1e9, 1)
    return out


def cpu_attention_translator(paged_kv, args: argparse.Namespace, blocks: int):  # type: ignore[no-untyped-def]
    """The CPU backend's packed pages, measured with its own writer (needs vLLM)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from lmcache_connector_vllm.cpu_attn_page import cpu_attention_page, cpu_attention_writer
    except ImportError:
        return None, None
    block = 128
    caches = paged_kv.allocate_paged_cache(
        "LBHNC", num_layers=args.layers, num_blocks=blocks * 16 // block, heads=args.heads,
        block_tokens=block, content=2 * args.head_size, dtype=torch.bfloat16,
    )
    first = next(iter(caches.values()))
    isa = _get_attn_isa(torch.bfloat16, block, args.head_size, "auto")
    page = cpu_attention_page(
        block_tokens=block, heads=args.heads, head_size=args.head_size, cache_dtype=torch.bfloat16,
        compute_dtype=torch.bfloat16, kv_cache_dtype="auto", isa=isa,
        token_stride=first.stride(2), head_stride=first.stride(1),
    )
    # the connector's own class, from the installed package, so the page map type matches
    from lmcache_connector_vllm.paged_kv import PagedKV

    writer = cpu_attention_writer(isa=isa, kv_cache_dtype="auto")
    return PagedKV(caches, block, planes=2, width=args.head_size, page=page, writer=writer), isa


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--blocks", type=int, default=0, help="16-token blocks in the cache (0: 512 on CPU, 4096 on CUDA)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    blocks = args.blocks or (4096 if device.type == "cuda" else 512)
    paged_kv = load_paged_kv()
    print(
        f"paged KV <-> canonical chunks on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{args.layers} layers x {args.heads} heads x {args.head_size}, bf16, {args.tokens}-token chunks "
        f"({args.layers * 2 * args.tokens * args.heads * args.head_size * 2 / 2**20:.0f} MiB), "
        f"{blocks * 16} cached tokens, best of {args.repeat} rounds of 8 chunks"
    )
    results = {}
    cases = [("LBNHC (FlashAttention NHD, Triton)", "LBNHC"), ("LBHNC (FlashAttention HND, FlashInfer)", "LBHNC"),
             ("BLHNC (cross-layer)", "BLHNC")]
    for label, layout in cases:
        caches = paged_kv.allocate_paged_cache(
            layout, num_layers=args.layers, num_blocks=blocks, heads=args.heads, block_tokens=16,
            content=2 * args.head_size, dtype=torch.bfloat16, device=device,
        )
        kv = paged_kv.PagedKV(caches, 16, planes=2, width=args.head_size)
        results[layout] = r = measure(kv, device, args.tokens, args.repeat)
        del caches, kv
        print(f"  {label:40s} store {r['store_gbps']:7.2f} GB/s = {r['store_ratio']:.2f} x copy_ "
              f"({r['store_baseline_gbps']:.2f});  load {r['load_gbps']:7.2f} GB/s = {r['load_ratio']:.2f} x copy_ "
              f"({r['load_baseline_gbps']:.2f})"
              + (f";  on device: gather {r['device_gather_gbps']} GB/s, copy_ {r['device_copy_gbps']} GB/s"
                 if device.type == "cuda" else ""))
    if device.type == "cpu":
        kv, isa = cpu_attention_translator(paged_kv, args, blocks)
        if kv is not None:
            results["CPU_ATTN"] = r = measure(kv, device, args.tokens, args.repeat)
            print(f"  {'CPU_ATTN packed pages (isa ' + str(isa) + ', 128-token blocks)':40s} store {r['store_gbps']:7.2f} GB/s = "
                  f"{r['store_ratio']:.2f} x copy_;  load {r['load_gbps']:7.2f} GB/s = {r['load_ratio']:.2f} x copy_")
    print(json.dumps({"device": str(device), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
