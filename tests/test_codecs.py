"""The ``lmcache_chunk_codecs`` hook, name resolution, and the engine applying codecs.

A real codec defined here (zlib from the standard library) keeps these core tests independent
of the ``lmcache_codecs`` plugin; its own tests cover zstd and int8.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from lmcache_core import hookimpl
from lmcache_core.codecs import (
    ChunkEncoding,
    CodecError,
    CodecSpec,
    UnknownCodecError,
    decode_chunk,
    encode_chunk,
)
from lmcache_core.config import load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import ConfigError, PluginError
from lmcache_core.plugins import codec_specs, describe_plugins, get_plugin_manager, resolve_codec

META = EngineMetadata("codec-model")


def _zlib_encode(tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(zlib.compress(raw, 1)), dtype=torch.uint8)


def _zlib_decode(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = bytearray(zlib.decompress(payload.numpy().tobytes()))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


ZLIB = CodecSpec("zlib", _zlib_encode, _zlib_decode, lossless=True, dtypes=frozenset({torch.bfloat16}))


class ZlibPlugin:
    @hookimpl
    def lmcache_chunk_codecs(self) -> list[CodecSpec]:
        return [ZLIB]


class ClashingPlugin:
    @hookimpl
    def lmcache_chunk_codecs(self) -> list[CodecSpec]:
        return [CodecSpec("zlib", _zlib_encode, _zlib_decode, lossless=True)]


def test_a_plugin_registers_a_codec_through_the_hook_and_the_core_resolves_it_by_name():
    pm = get_plugin_manager(extra_plugins=[ZlibPlugin()])
    specs = codec_specs(pm)
    assert specs["zlib"] is ZLIB
    assert resolve_codec(pm, "zlib").lossless
    assert ZLIB.plugin  # filled with the registering plugin's name
    listed = {p["name"]: p for p in describe_plugins(pm)}
    assert listed[ZLIB.plugin]["codecs"] == ["zlib"]


def test_an_unknown_codec_name_lists_the_installed_ones():
    pm = get_plugin_manager(extra_plugins=[ZlibPlugin()])
    with pytest.raises(UnknownCodecError) as info:
        resolve_codec(pm, "zlibb")
    assert str(info.value).startswith("unknown codec 'zlibb'; available: ")
    assert "zlib" in info.value.available


def test_two_plugins_claiming_one_codec_name_is_an_error_naming_both():
    pm = get_plugin_manager(extra_plugins=[ZlibPlugin(), ClashingPlugin()])
    with pytest.raises(PluginError, match=r"codec 'zlib' is registered by two plugins: '.+' and '.+'"):
        codec_specs(pm)


def test_encode_chunk_refuses_a_dtype_the_codec_does_not_list_and_names_those_it_does():
    with pytest.raises(CodecError, match=r"codec 'zlib' cannot encode float32; it supports: bfloat16"):
        encode_chunk(ZLIB, torch.zeros(4))


def test_decode_chunk_turns_a_codec_failure_or_a_wrong_result_into_a_codec_error():
    payload, encoding = encode_chunk(ZLIB, torch.zeros(2, 3, dtype=torch.bfloat16))
    assert decode_chunk(ZLIB, payload, encoding).shape == (2, 3)
    with pytest.raises(CodecError, match="'zlib' failed to decode"):
        decode_chunk(ZLIB, payload[:6], encoding)  # truncated
    flat = CodecSpec("zlib", _zlib_encode, lambda p, d, s: _zlib_decode(p, d, (-1,)), lossless=True)
    with pytest.raises(CodecError, match=r"decoded a torch.bfloat16 \(6,\) tensor; the chunk was"):
        decode_chunk(flat, payload, encoding)


def _engine(tmp_path, **settings) -> CacheEngine:
    base = dict(chunk_size=16, max_local_cpu_size=0.01, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    return CacheEngine(load_settings(**{**base, **settings}), META, get_plugin_manager(extra_plugins=[ZlibPlugin()]))


def _kv(n: int) -> torch.Tensor:
    # compressible: few distinct values, like a real cache's exponent bytes
    return (torch.arange(2 * 2 * n * 32, dtype=torch.float32).reshape(2, 2, n, 32) % 8).to(torch.bfloat16)


def test_store_codecs_encode_at_their_location_and_every_read_decodes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    tokens = list(range(40))
    kv = _kv(40)
    with _engine(tmp_path, store_codecs={"LocalCPUBackend": "zlib"}) as engine:
        engine.store(tokens, kv)
        engine.flush()
        cpu = engine.backend("LocalCPUBackend")
        key = engine.keys.key(engine.hasher.hashes(tokens)[0])
        with cpu.get(key) as view:
            assert view.encoding == ChunkEncoding("zlib", torch.bfloat16, (2, 2, 16, 32))
        assert cpu.stats()["used_bytes"] < kv.numel() * 2 / 4
        n, got = engine.retrieve_tensor(tokens)
        assert n == 40 and torch.equal(got.view(torch.int16), kv.view(torch.int16))
        hold = engine.hold(tokens)
        try:
            assert all(view.encoding is None for _, view in hold.chunks)
            assert torch.equal(torch.cat([v.tensor for _, v in hold.chunks], dim=2), kv)
        finally:
            hold.release()


def test_compress_and_decompress_recode_a_location_in_place_without_an_event(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    tokens = list(range(40))
    kv = _kv(40)
    with _engine(tmp_path) as engine:
        engine.store(tokens, kv)
        engine.flush()
        seen = []
        engine.subscribe(seen.append)
        before = engine.stats()["LocalCPUBackend"]["used_bytes"]
        assert engine.compress("LocalCPUBackend", "zlib", tokens[:20]) == 16  # one whole chunk
        assert engine.compress("LocalCPUBackend", "zlib") == 24  # the rest
        assert engine.compress("LocalCPUBackend", "zlib") == 0  # nothing left to do
        after = engine.stats()["LocalCPUBackend"]["used_bytes"]
        assert after < before / 4
        assert engine.lookup(tokens) == 40
        assert torch.equal(engine.retrieve_tensor(tokens)[1], kv)
        assert engine.decompress("LocalCPUBackend", "zlib") == 40
        assert engine.stats()["LocalCPUBackend"]["used_bytes"] == before
        assert seen == []  # keys and tokens stayed: nothing to tell the controller
        with pytest.raises(UnknownCodecError, match="available: .*zlib"):
            engine.compress("LocalCPUBackend", "nope")


def test_store_codecs_naming_a_location_not_enabled_or_a_codec_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    with pytest.raises(ConfigError, match="'LocalGPUBackend', which is not enabled"):
        _engine(tmp_path, store_codecs={"LocalGPUBackend": "zlib"})
    with pytest.raises(ConfigError, match="unknown codec 'lz5'"):
        _engine(tmp_path, store_codecs={"LocalCPUBackend": "lz5"})


def test_a_chunk_the_codec_cannot_shrink_is_stored_as_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(-32768, 32767, (2, 2, 16, 32), generator=gen, dtype=torch.int16).view(torch.bfloat16)
    with _engine(tmp_path, store_codecs={"LocalCPUBackend": "zlib"}) as engine:
        engine.store(list(range(16)), noise)
        key = engine.keys.key(engine.hasher.hashes(list(range(16)))[0])
        with engine.backend("LocalCPUBackend").get(key) as view:
            assert view.encoding is None
        assert engine.stats()["LocalCPUBackend"]["used_bytes"] == math.prod(noise.shape) * 2
