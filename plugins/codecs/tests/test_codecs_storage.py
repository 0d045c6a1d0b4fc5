"""Encoded chunks in the real backends: the CPU pool counts compressed bytes, the disk tier's
files record the codec (read back after a restart and by another instance), pins survive a
recode, and views taken before a recode stay intact."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from lmcache_core.codecs import ChunkEncoding
from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata

from lmcache_backend_disk.chunkfile import CHUNK_SUFFIX

from lmcache_codecs import int8_error_bound

META = EngineMetadata("codec-model")
CHUNK = 64
LAYERS, WIDTH = 2, 256  # a chunk of 64 tokens: [2, 2, 64, 256] bfloat16 = 128 KiB


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)


def kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """bfloat16 KV shaped like a model's: normal values, a few larger channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(LAYERS, 2, num_tokens, WIDTH, generator=gen)
    x[..., ::32] *= 8
    return x.to(torch.bfloat16)


def make_engine(tmp_path: Path, **settings) -> CacheEngine:
    base = dict(chunk_size=CHUNK, max_local_cpu_size=1 / 1024, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.05)
    return CacheEngine(load_settings(**{**base, **settings}), META)


def tokens(n: int, offset: int = 0) -> list[int]:
    return [(i * 7919 + offset) % 50000 for i in range(n)]


def chunk_bytes() -> int:
    return LAYERS * 2 * CHUNK * WIDTH * 2


def test_cpu_capacity_counts_compressed_bytes_so_more_chunks_fit(tmp_path):
    # a 1 MiB pool holds 8 raw chunks of 128 KiB; int8 halves them, so 12 chunks all fit
    toks, data = tokens(12 * CHUNK), kv(12 * CHUNK)
    with make_engine(tmp_path, local_disk=None) as raw_engine:
        raw_engine.store(toks, data)
        raw = raw_engine.stats()["LocalCPUBackend"]
        assert raw["chunks"] == 8 and raw["evictions"] == 4
    with make_engine(tmp_path, local_disk=None, store_codecs={"LocalCPUBackend": "int8"}) as engine:
        engine.store(toks, data)
        stats = engine.stats()["LocalCPUBackend"]
        assert stats["chunks"] == 12 and stats["evictions"] == 0
        # per chunk: one byte per value plus a float32 scale per (layer, k/v, channel)
        assert stats["used_bytes"] == 12 * (chunk_bytes() // 2 + 4 * LAYERS * 2 * WIDTH)
        n, got = engine.retrieve_tensor(toks)
        assert n == len(toks)
        assert bool(((got.double() - data.double()).abs() <= int8_error_bound(data, got)).all())


def test_compress_shrinks_cpu_chunks_in_place_and_decompress_restores_the_bytes(tmp_path):
    toks, data = tokens(4 * CHUNK), kv(4 * CHUNK)
    with make_engine(tmp_path, local_disk=None) as engine:
        engine.store(toks, data)
        before = engine.stats()["LocalCPUBackend"]["used_bytes"]
        assert engine.compress("LocalCPUBackend", "zstd") == len(toks)
        compressed = engine.stats()["LocalCPUBackend"]["used_bytes"]
        assert compressed < before * 0.9
        assert torch.equal(engine.retrieve_tensor(toks)[1].view(torch.int16), data.view(torch.int16))
        assert engine.decompress("LocalCPUBackend", "zstd") == len(toks)
        assert engine.stats()["LocalCPUBackend"]["used_bytes"] == before


def test_a_recode_keeps_pins_and_leaves_a_view_taken_before_it_intact(tmp_path):
    toks, data = tokens(2 * CHUNK), kv(2 * CHUNK)
    with make_engine(tmp_path, local_disk=None) as engine:
        engine.store(toks, data)
        cpu = engine.backend("LocalCPUBackend")
        keys = [engine.keys.key(h) for h in engine.hasher.hashes(toks)]
        assert cpu.pin(keys[0])
        view = cpu.get(keys[1])
        expected = view.tensor.clone()
        assert engine.compress("LocalCPUBackend", "int8") == len(toks)
        # the old range is not reused while the view reads it: fill the pool to make sure
        engine.store(tokens(6 * CHUNK, offset=1), kv(6 * CHUNK, seed=1))
        assert torch.equal(view.tensor, expected)
        view.release()
        assert cpu.stats()["pinned"] == 1
        engine.store(tokens(16 * CHUNK, offset=2), kv(16 * CHUNK, seed=2))  # evicts all it can
        assert cpu.contains(keys[0]) and not cpu.contains(keys[1])
        with cpu.get(keys[0]) as pinned:
            assert pinned.encoding is not None and pinned.encoding.codec == "int8"


def _file_versions(area: Path) -> dict[int, int]:
    versions: dict[int, int] = {}
    for path in area.rglob(f"*{CHUNK_SUFFIX}"):
        version = struct.unpack_from("<H", path.read_bytes(), 8)[0]
        versions[version] = versions.get(version, 0) + 1
    return versions


def test_disk_files_record_the_codec_and_a_restarted_engine_decodes_them(tmp_path):
    toks, data = tokens(3 * CHUNK), kv(3 * CHUNK)
    disk = tmp_path / "disk"
    with make_engine(tmp_path) as engine:
        engine.store(toks, data)
        engine.flush()
        assert _file_versions(disk) == {1: 3}  # stored as they are: the format every release reads
        raw_bytes = engine.stats()["LocalDiskBackend"]["used_bytes"]
        assert engine.compress("LocalDiskBackend", "zstd", toks[: 2 * CHUNK]) == 2 * CHUNK
        assert _file_versions(disk) == {1: 1, 2: 2}
        assert engine.stats()["LocalDiskBackend"]["used_bytes"] < raw_bytes
    with make_engine(tmp_path) as restarted:
        assert restarted.stats()["LocalCPUBackend"]["chunks"] == 0
        assert restarted.lookup(toks) == len(toks)
        disk_backend = restarted.backend("LocalDiskBackend")
        with disk_backend.get(restarted.keys.key(restarted.hasher.hashes(toks)[0])) as view:
            assert view.encoding == ChunkEncoding("zstd", torch.bfloat16, (LAYERS, 2, CHUNK, WIDTH))
        n, got = restarted.retrieve_tensor(toks)
        assert n == len(toks)
        assert torch.equal(got.view(torch.int16), data.view(torch.int16))
        # promoted into the CPU tier in the encoded form: it stays compressed there too
        cpu = restarted.backend("LocalCPUBackend")
        with cpu.get(restarted.keys.key(restarted.hasher.hashes(toks)[0])) as view:
            assert view.encoding is not None and view.encoding.codec == "zstd"


def test_another_instance_sharing_the_directory_decodes_an_int8_chunk_file(tmp_path):
    toks, data = tokens(2 * CHUNK), kv(2 * CHUNK)
    with make_engine(tmp_path, lmcache_instance_id="writer", store_codecs={"LocalDiskBackend": "int8"}) as writer:
        writer.store(toks, data)
        writer.flush()
        with make_engine(tmp_path, lmcache_instance_id="reader") as reader:
            n, got = reader.retrieve_tensor(toks)
            assert n == len(toks)
            assert bool(((got.double() - data.double()).abs() <= int8_error_bound(data, got)).all())
