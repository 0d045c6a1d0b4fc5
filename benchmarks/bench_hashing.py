"""Chunk hashing throughput (target: at least 20M tokens/s).

Baselines measured in the same run: one xxh3_64 call over the whole token buffer (the ceiling
for any chunked scheme) and a sha256 chain per chunk (a common choice in other caches).
"""

from __future__ import annotations

import hashlib

import numpy as np

from _report import best_rate, print_table, verdict
from lmcache_core.keys import TokenHasher, as_token_array


def sha256_chain(tokens: list[int], chunk_size: int) -> list[bytes]:
    data = as_token_array(tokens).tobytes()
    prev, out = b"", []
    for off in range(0, len(data), chunk_size * 8):
        prev = hashlib.sha256(prev + data[off : off + chunk_size * 8]).digest()
        out.append(prev)
    return out


def main() -> None:
    import xxhash

    rng = np.random.default_rng(0)
    n = 8192
    as_list = [int(t) for t in rng.integers(0, 128_000, n)]
    as_array = np.array(as_list, dtype=np.int64)
    hasher = TokenHasher(256)
    ours_list = best_rate(lambda: hasher.hashes(as_list), n)
    ours_array = best_rate(lambda: hasher.hashes(as_array), n)
    ceiling = best_rate(lambda: xxhash.xxh3_64_intdigest(as_token_array(as_list)), n)
    sha = best_rate(lambda: sha256_chain(as_list, 256), n)
    rows = [
        ("ours, from a list of ints", f"{ours_list / 1e6:8.1f} M tok/s", f"{verdict(ours_list >= 20e6)} (target >= 20 M tok/s)"),
        ("ours, from an int64 array", f"{ours_array / 1e6:8.1f} M tok/s", verdict(ours_array >= 20e6)),
        ("baseline: one xxh3 over the list", f"{ceiling / 1e6:8.1f} M tok/s", f"ours/ceiling = {ours_list / ceiling:.2f}"),
        ("baseline: sha256 chain", f"{sha / 1e6:8.1f} M tok/s", f"ours/sha256 = {ours_list / sha:.2f}"),
    ]
    print_table(f"Chunk hashing, {n}-token prompt, chunk_size 256", rows)


if __name__ == "__main__":
    main()
