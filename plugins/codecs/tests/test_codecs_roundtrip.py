"""zstd and int8 on real tensors: bit-exact round trips, the int8 bound, refusals."""

from __future__ import annotations

import pytest
import torch

from lmcache_core.codecs import CodecError, decode_chunk, encode_chunk
from lmcache_core.plugins import codec_specs, get_plugin_manager

from lmcache_codecs import INT8, ZSTD, int8_error_bound

ALL_DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every bit pattern equally likely (NaNs and infs included for float dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def kv_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[..., 3] *= 40.0  # an outlier channel, as keys have
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def test_the_plugin_registers_zstd_lossless_and_int8_lossy():
    specs = codec_specs(get_plugin_manager())
    assert specs["zstd"].lossless and specs["zstd"].plugin == "codecs"
    assert not specs["int8"].lossless and specs["int8"].dtype_names() == ["bfloat16", "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_zstd_round_trip_is_bit_exact_for_every_dtype(dtype):
    x = random_bits((3, 17, 40), dtype)
    payload, encoding = encode_chunk(ZSTD, x)
    assert same_bits(decode_chunk(ZSTD, payload, encoding), x)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3)], ids=str)
def test_zstd_round_trips_empty_and_scalar_tensors(shape):
    x = random_bits(shape, torch.float16)
    payload, encoding = encode_chunk(ZSTD, x)
    assert same_bits(decode_chunk(ZSTD, payload, encoding), x)


def test_zstd_reads_a_non_contiguous_chunk_and_shrinks_float_kv():
    x = kv_like((2, 64, 256), torch.bfloat16).transpose(1, 2)  # strided view
    payload, encoding = encode_chunk(ZSTD, x)
    assert same_bits(decode_chunk(ZSTD, payload, encoding), x)
    assert payload.numel() < x.numel() * 2 * 0.85  # the exponent plane compresses


def test_zstd_refuses_a_damaged_payload():
    payload, encoding = encode_chunk(ZSTD, kv_like((4, 64), torch.float32))
    bad = payload.clone()
    bad[len(bad) // 2 :] = 0
    with pytest.raises(CodecError):
        decode_chunk(ZSTD, bad, encoding)
    with pytest.raises(CodecError, match="expected"):
        decode_chunk(ZSTD, payload, encoding.__class__("zstd", torch.float32, (8, 64)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 96), (4, 7), (33,), (2, 3, 5, 8)], ids=str)
def test_int8_keeps_every_element_within_the_stated_bound(dtype, shape):
    x = kv_like(shape, dtype, seed=len(shape))
    kept = x.clone()
    payload, encoding = encode_chunk(INT8, x)
    assert torch.equal(x, kept)  # the caller's tensor is never written
    y = decode_chunk(INT8, payload, encoding)
    assert y.dtype == dtype and y.shape == x.shape
    error = (y.double() - x.double()).abs()
    bound = int8_error_bound(x, y)
    assert bool((error <= bound).all()), f"worst excess {(error - bound).max().item()}"
    assert error.max() > 0  # it is lossy: the test would notice a codec that stored nothing new
    if len(shape) >= 2:  # one float32 scale per lead and channel, one byte per value
        assert payload.numel() == x.numel() + 4 * x.numel() // shape[-2]


def test_int8_brings_a_channel_of_zeros_back_exactly_and_relative_error_stays_under_one_percent():
    x = kv_like((2, 64, 128), torch.bfloat16)
    x[:, :, 5] = 0
    y = decode_chunk(INT8, *encode_chunk(INT8, x))
    assert torch.equal(y[:, :, 5], x[:, :, 5])
    channel_max = x.double().abs().amax(dim=1, keepdim=True)
    relative = ((y.double() - x.double()).abs() / channel_max.clamp_min(1e-30)).max()
    assert relative <= 1 / 254 + 2**-8


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float8_e4m3fn, torch.bool], ids=str)
def test_int8_refuses_dtypes_it_does_not_list(dtype):
    with pytest.raises(CodecError, match="it supports: bfloat16, float16, float32, float64"):
        encode_chunk(INT8, torch.zeros(4, 4).to(dtype))


def test_int8_refuses_values_it_cannot_quantise_and_a_payload_of_the_wrong_size():
    x = torch.ones(4, 4)
    x[1, 1] = float("inf")
    with pytest.raises(CodecError, match="inf or NaN"):
        encode_chunk(INT8, x)
    payload, encoding = encode_chunk(INT8, torch.ones(4, 4))
    with pytest.raises(CodecError, match="needs"):
        decode_chunk(INT8, payload[:-1], encoding)
