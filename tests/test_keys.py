"""Chunking and the prefix-chained hash: stable, chained, namespaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
import xxhash

from lmcache_core.keys import ChunkKey, TokenHasher, namespace_seed

PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


def test_a_short_prompt_is_one_partial_chunk():
    spans = TokenHasher(256).spans(PROMPT)
    assert [(s.start, s.end, s.num_tokens) for s in spans] == [(0, 12, 12)]


def test_chunks_cover_every_token_with_a_partial_last_chunk():
    spans = TokenHasher(4).spans(list(range(10)))
    assert [(s.start, s.end) for s in spans] == [(0, 4), (4, 8), (8, 10)]


def test_hash_follows_the_documented_scheme():
    tokens = list(range(1000, 1010))
    seed = xxhash.xxh3_64_intdigest(b"lmcache/v1" + b"tenant", seed=0)
    first = xxhash.xxh3_64_intdigest(np.array(tokens[:8], dtype="<i8").tobytes(), seed=seed)
    second = xxhash.xxh3_64_intdigest(np.array(tokens[8:], dtype="<i8").tobytes(), seed=first)
    assert TokenHasher(8, "tenant").hashes(tokens) == [first, second]


def test_hash_of_known_inputs_never_changes():
    # golden values: changing them orphans every stored cache and breaks other implementations
    assert [f"{h:016x}" for h in TokenHasher(256).hashes(PROMPT)] == ["48098da4be1d8c84"]
    assert [f"{h:016x}" for h in TokenHasher(4, "tenant-a").hashes(range(10))] == [
        "43e0333e7a7a821a",
        "7bd9000fd0b401c2",
        "4f0dbad5a503afde",
    ]


def test_each_hash_names_its_whole_prefix():
    h = TokenHasher(4)
    a = h.hashes([1, 2, 3, 4, 5, 6, 7, 8])
    b = h.hashes([1, 2, 3, 4, 5, 6, 7, 9])
    c = h.hashes([0, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0] and a[1] != c[1]  # same second chunk, different prefix


def test_namespace_changes_every_hash():
    assert set(TokenHasher(4, "a").hashes(range(12))).isdisjoint(TokenHasher(4, "b").hashes(range(12)))


def test_hashes_are_64_bit_and_accept_lists_arrays_and_tensors():
    h = TokenHasher(5)
    expected = h.hashes(list(range(23)))
    assert h.hashes(np.arange(23, dtype=np.int32)) == expected
    assert h.hashes(torch.arange(23)) == expected
    assert all(0 <= v < 2**64 for v in expected) and max(expected) > 2**32


def test_hash_is_the_same_in_another_process_with_another_hash_seed():
    code = (
        "import json; from lmcache_core.keys import TokenHasher; "
        "print(json.dumps(TokenHasher(3, 'ns').hashes(list(range(50)))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == TokenHasher(3, "ns").hashes(list(range(50)))


def test_chunk_key_text_form_round_trips_odd_model_names():
    key = ChunkKey("org/model@v2", 4, 3, "bfloat16", 2**64 - 1)
    text = key.to_string()
    assert "/" not in text
    assert ChunkKey.from_string(text) == key


def test_keys_of_different_models_or_shards_never_collide():
    h = TokenHasher(256).hashes(PROMPT)[0]
    keys = {
        ChunkKey("m1", 1, 0, "bfloat16", h),
        ChunkKey("m2", 1, 0, "bfloat16", h),
        ChunkKey("m1", 2, 0, "bfloat16", h),
        ChunkKey("m1", 2, 1, "bfloat16", h),
        ChunkKey("m1", 1, 0, "float16", h),
    }
    assert len(keys) == 5
