"""The cache engine over real backends: round trips, prefixes, tiering, events, pins."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import UnknownLocationError
from lmcache_core.events import EventKind, KVEvent
from lmcache_core.plugins import get_plugin_manager

PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
META = EngineMetadata("test-model", world_size=1, worker_id=0, kv_dtype="bfloat16")


def kv_for(tokens: list[int], dtype: torch.dtype = torch.bfloat16, layers: int = 2) -> torch.Tensor:
    """Deterministic KV whose values depend on the token ids, [layers, 2, tokens, 16]."""
    t = torch.tensor(tokens, dtype=torch.float64)
    base = torch.arange(layers * 2 * 16, dtype=torch.float64).reshape(layers, 2, 1, 16)
    return (torch.sin(base + t.reshape(1, 1, -1, 1) * 0.001) * 100).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    settings = load_settings(
        chunk_size=256, max_local_cpu_size=0.05, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.1
    )
    with CacheEngine(settings, META) as eng:
        yield eng


def tokens(n: int, offset: int = 0) -> list[int]:
    return [(i * 7919 + offset) % 50000 for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact(engine, dtype):
    toks = tokens(700)
    kv = kv_for(toks, dtype)
    assert engine.store(toks, kv) == 700
    n, got = engine.retrieve_tensor(toks)
    assert n == 700 and got.dtype == dtype
    assert torch.equal(bits(got), bits(kv))


def test_locations_are_cpu_then_disk(engine):
    assert engine.locations == ["LocalCPUBackend", "LocalDiskBackend"]


def test_a_twelve_token_prompt_is_cached_and_cleared_as_twelve_tokens(engine):
    assert engine.store(PROMPT, kv_for(PROMPT)) == 12
    assert engine.lookup(PROMPT) == 12
    engine.flush()
    assert engine.clear("LocalCPUBackend") == 12
    assert engine.clear("LocalDiskBackend") == 12
    assert engine.lookup(PROMPT) == 0


def test_lookup_counts_the_longest_stored_prefix(engine):
    toks = tokens(1000)
    engine.store(toks[:600], kv_for(toks[:600]))
    assert engine.lookup(toks[:600]) == 600  # partial last chunk included
    assert engine.lookup(toks) == 512  # a longer prompt only shares the full chunks
    assert engine.lookup(tokens(1000, offset=1)) == 0
    n, got = engine.retrieve_tensor(toks)
    assert n == 512 and torch.equal(bits(got), bits(kv_for(toks)[:, :, :512]))


def test_store_skips_chunks_already_stored_and_asks_only_for_missing_ones(engine):
    toks = tokens(800)
    engine.store(toks[:512], kv_for(toks[:512]))
    asked: list[tuple[int, int]] = []

    def chunk_fn(start: int, end: int) -> torch.Tensor:
        asked.append((start, end))
        return kv_for(toks)[:, :, start:end]

    assert engine.store(toks, chunk_fn=chunk_fn) == 288
    assert asked == [(512, 768), (768, 800)]
    assert engine.lookup(toks) == 800


def test_store_rejects_kv_of_the_wrong_length(engine):
    with pytest.raises(ValueError, match="kv has 11 entries in dimension 2 but there are 12 tokens"):
        engine.store(PROMPT, kv_for(PROMPT[:11]))


def test_store_writes_behind_to_disk_and_a_disk_hit_is_promoted_to_cpu(engine):
    toks = tokens(600)
    kv = kv_for(toks)
    engine.store(toks, kv)
    assert engine.flush(timeout=30)
    disk = engine.backend("LocalDiskBackend")
    cpu = engine.backend("LocalCPUBackend")
    assert len(disk.inventory()) == 3
    cpu.clear()
    assert engine.lookup(toks) == 600  # still on disk
    n, got = engine.retrieve_tensor(toks)
    assert n == 600 and torch.equal(bits(got), bits(kv))
    assert len(cpu.inventory()) == 3  # promoted


def test_caller_may_reuse_its_buffer_right_after_store(engine):
    toks = tokens(300)
    kv = kv_for(toks)
    expected = kv.clone()
    engine.store(toks, kv)
    kv.zero_()  # vLLM reuses KV blocks as soon as the store returns
    engine.flush(timeout=30)
    engine.backend("LocalCPUBackend").clear()
    n, got = engine.retrieve_tensor(toks)
    assert n == 300 and torch.equal(bits(got), bits(expected))


def test_every_admit_and_clear_is_announced_in_order(engine):
    events: list[KVEvent] = []
    done = threading.Event()

    def collect(event: KVEvent) -> None:
        events.append(event)
        if event.location == "LocalDiskBackend" and event.kind == EventKind.ADMIT and event.num_tokens == 12:
            done.set()

    engine.subscribe(collect)
    engine.store(PROMPT, kv_for(PROMPT))
    assert done.wait(30)
    engine.clear("LocalCPUBackend")
    cpu = [(e.kind, e.num_tokens, e.seq) for e in events if e.location == "LocalCPUBackend"]
    assert cpu == [(EventKind.ADMIT, 12, 1), (EventKind.CLEAR, 12, 2)]
    disk = [(e.kind, e.num_tokens) for e in events if e.location == "LocalDiskBackend"]
    assert disk == [(EventKind.ADMIT, 12)]
    assert events[0].key == engine.keys.key(engine.hasher.hashes(PROMPT)[0])


def test_clear_of_an_unknown_location_lists_the_enabled_ones(engine):
    with pytest.raises(UnknownLocationError) as info:
        engine.clear("LocalGPUBackend")
    assert str(info.value) == "unknown location 'LocalGPUBackend'; available: LocalCPUBackend, LocalDiskBackend"


def test_remove_drops_a_prompt_from_every_location(engine):
    toks = tokens(300)
    engine.store(toks, kv_for(toks))
    engine.flush(timeout=30)
    assert engine.remove(toks) == 300
    assert engine.lookup(toks) == 0
    assert all(not inv for inv in engine.inventory().values())


def test_pinned_prompt_survives_eviction_pressure(tmp_path):
    settings = load_settings(chunk_size=256, max_local_cpu_size=4 / 1024)  # 4 MiB
    with CacheEngine(settings, META) as eng:
        keep = tokens(256, offset=99)
        eng.store(keep, kv_for(keep, torch.float32, layers=8))  # 256 KiB
        assert eng.pin(keep) == 256
        for i in range(40):  # ~10 MiB more than fits
            other = tokens(256, offset=1000 + i)
            eng.store(other, kv_for(other, torch.float32, layers=8))
        assert eng.lookup(keep) == 256
        assert eng.unpin(keep) == 256


def test_engine_with_an_outside_plugin_location(outside_plugin, monkeypatch):
    monkeypatch.setenv("LMCACHE_PLUGINS", "thirdloc")
    pm = get_plugin_manager()
    with CacheEngine(load_settings(pm, chunk_size=4), META, pm) as eng:
        assert eng.locations == ["TestDictBackend"]
        eng.store(PROMPT, kv_for(PROMPT))
        assert eng.lookup(PROMPT) == 12
        assert eng.clear("TestDictBackend") == 12


def test_flush_returns_true_once_the_disk_queue_is_drained(engine):
    toks = tokens(600)
    engine.store(toks, kv_for(toks))
    assert engine.flush(timeout=30) is True
    assert engine.backend("LocalDiskBackend").stats()["queued"] == 0


def test_chunks_of_another_shard_found_on_a_shared_disk_are_neither_announced_nor_listed(tmp_path, monkeypatch):
    """An instance is never credited with chunks it cannot load: another model's (or rank's, or
    dtype's) files in its own disk area are not announced at the re-scan nor in its inventory."""
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    settings = load_settings(chunk_size=256, max_local_cpu_size=0.05, local_disk=str(tmp_path / "disk"))
    other_shards = [
        EngineMetadata("another-model", 1, 0, "bfloat16"),
        EngineMetadata("test-model", 2, 1, "bfloat16"),
        EngineMetadata("test-model", 1, 0, "float16"),
    ]
    for i, meta in enumerate([META, *other_shards]):  # one after another, in the same area
        with CacheEngine(settings, meta) as writer:
            toks = tokens(300, offset=i)
            writer.store(toks, kv_for(toks))
            assert writer.flush(10)
    with CacheEngine(settings, META) as engine:
        disk = engine.backend("LocalDiskBackend")
        assert len(disk.inventory()) == 8  # 2 chunks from each of the 4 shards are on disk
        own = engine.inventory()["LocalDiskBackend"]  # what a worker's resync sends
        assert len(own) == 2 and all(engine.owns(key) for key, _ in own)
        assert engine.lookup(tokens(300, offset=0)) == 300
        for i in range(1, 4):  # none of the others' can be looked up or loaded
            assert engine.lookup(tokens(300, offset=i)) == 0


def test_the_engine_announces_only_its_own_shard_when_a_backend_admits_others(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    settings = load_settings(chunk_size=256, max_local_cpu_size=0.05)
    seen: list[KVEvent] = []
    with CacheEngine(settings, META) as engine:
        engine.subscribe(seen.append)
        cpu = engine.backend("LocalCPUBackend")
        foreign = EngineMetadata("another-model")
        from lmcache_core.keys import KeyMaker

        key = KeyMaker(foreign.model_name, 1, 0, "bfloat16").key(42)
        assert cpu.put(key, torch.zeros(4, 4), 4)
        engine.store(PROMPT, kv_for(PROMPT))
        assert [(e.kind, e.key.model_name) for e in seen] == [(EventKind.ADMIT, "test-model")]
        assert [k.model_name for k, _ in engine.inventory()["LocalCPUBackend"]] == ["test-model"]


def test_move_keeps_data_bit_exact_and_a_full_target_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    # a disk tier smaller than any chunk (32 KiB of KV, 11 KiB for the last 88 tokens): every
    # put there is refused
    settings = load_settings(chunk_size=256, max_local_cpu_size=0.05, local_disk=str(tmp_path / "disk"),
                             max_local_disk_size=8 * 1024 / 2**30)
    toks = tokens(600)
    kv = kv_for(toks)
    with CacheEngine(settings, META) as eng:
        eng.store(toks, kv)
        eng.flush(10)
        assert eng.inventory_at("LocalDiskBackend") == []
        assert eng.move("LocalCPUBackend", "LocalDiskBackend") == 0  # nothing fits: nothing leaves
        assert len(eng.inventory_at("LocalCPUBackend")) == 3
        n, got = eng.retrieve_tensor(toks)
        assert n == 600 and torch.equal(bits(got), bits(kv))
        with pytest.raises(ValueError, match="to itself"):
            eng.move("LocalCPUBackend", "LocalCPUBackend")


def test_move_to_disk_and_back_and_pins_per_location(engine):
    toks = tokens(600)
    kv = kv_for(toks)
    engine.store(toks, kv)
    engine.flush(10)
    assert engine.clear("LocalDiskBackend") == 600
    assert engine.pin(toks, "LocalCPUBackend") == 600
    assert engine.stats()["LocalDiskBackend"]["pinned_bytes"] == 0
    assert engine.move("LocalCPUBackend", "LocalDiskBackend", toks[:512]) == 512  # two full chunks
    assert [n for _, n in engine.inventory_at("LocalCPUBackend")] == [88]
    assert sorted(n for _, n in engine.inventory_at("LocalDiskBackend")) == [256, 256]
    assert engine.move("LocalDiskBackend", "LocalCPUBackend", should_copy=True) == 512
    assert len(engine.inventory_at("LocalDiskBackend")) == 2 and len(engine.inventory_at("LocalCPUBackend")) == 3
    n, got = engine.retrieve_tensor(toks)
    assert n == 600 and torch.equal(bits(got), bits(kv))
    assert engine.unpin(None, "LocalCPUBackend") == 88  # only the chunk that stayed is still pinned
