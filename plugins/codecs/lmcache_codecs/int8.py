"""``int8``: lossy. 8-bit quantisation with one float32 scale per channel.

A chunk is seen as ``[lead, rows, channels]``: its last dimension is the channel, the one
before counts rows, every earlier one is kept apart (``lead``). For lmcache's canonical KV
chunk ``[layers, tokens, heads * content]`` that is one scale per layer and channel over the
chunk's tokens (a 1-D tensor is one channel). Per channel ``c``:

    scale_c = max |x| over the channel / 127
    q = round(x * (127 / max |x|)), in [-127, 127]  stored: scales (float32), then q (int8)
    x' = q * scale_c, rounded to the chunk's dtype  what decoding returns

**Accuracy bound** (tested): every element ``x`` of channel ``c`` comes back as ``x'`` with

    |x' - x| <= scale_c * (1/2 + 2**-15) + ulp(x') / 2

``scale_c / 2`` is the rounding to the 8-bit grid, ``2**-15`` covers float32 arithmetic and
``ulp(x') / 2`` the final rounding to the chunk's dtype (``ulp``: the wider of the dtype's two
spacings around ``x'``; bfloat16: at most 2**-7 of ``x'``, so half of it 2**-8).
Relative to the channel's largest magnitude ``m``, that is at most ``m / 254 + m * 2**-8`` in
bfloat16 (0.79%), ``m / 254 + m * 2**-11`` in float16, about ``m / 254`` in float32. A channel
of zeros comes back exactly. Non-finite values (inf, NaN) cannot be quantised: encoding them
is an error, and ``compress`` leaves such chunks as they are.

A payload is about half a bfloat16 chunk (a quarter of a float32 one) plus 4 bytes per layer
and channel: a chunk of fewer than about 4 rows would grow, so ``compress`` keeps it as it is.
"""

from __future__ import annotations

import math

import torch

from lmcache_core.codecs import CodecError, CodecSpec

SUPPORTED = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
QMAX = 127


def _grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(lead, rows, channels)`` of a chunk of ``shape``."""
    if len(shape) >= 2:
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    return 1, math.prod(shape), 1


def encode(tensor: torch.Tensor) -> torch.Tensor:
    """Scales (float32, one per lead and channel), then the int8 values: a 1-D uint8 payload."""
    lead, rows, channels = _grid(tuple(tensor.shape))
    x = tensor.detach().cpu().reshape(lead, rows, channels)  # in its own dtype: no wide copy
    if rows == 0 or lead == 0 or channels == 0:
        amax = torch.zeros(lead, 1, channels)
    else:
        amax = x.abs().amax(dim=1, keepdim=True).to(torch.float32)  # exact in float32
    if not bool(torch.isfinite(amax).all()):
        raise CodecError("int8 cannot quantise a chunk holding inf or NaN")
    scale = amax / QMAX
    inverse = torch.where(amax > 0, QMAX / amax, 0.0)
    # |x * inverse| <= 127 * (1 + 2**-22): it rounds into [-127, 127], no clamp needed
    # widen into a copy of our own (never the caller's tensor), then scale it in place: faster
    # on CPU than one mixed-dtype multiply
    y = x.to(torch.promote_types(x.dtype, torch.float32), copy=True).mul_(inverse)
    q = y.round_().to(torch.int8)
    return torch.cat([scale.reshape(-1).view(torch.uint8), q.reshape(-1).view(torch.uint8)])


def decode(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``q * scale`` per channel, in ``dtype``."""
    lead, rows, channels = _grid(shape)
    n_scales = lead * channels * 4
    expected = n_scales + lead * rows * channels
    if payload.numel() != expected:
        raise CodecError(f"int8 payload has {payload.numel()} bytes, a {shape} chunk needs {expected}")
    scale = payload[:n_scales].clone().view(torch.float32).reshape(lead, 1, channels)
    q = payload[n_scales:].view(torch.int8).reshape(lead, rows, channels)
    return q.to(torch.float32).mul_(scale).to(dtype).reshape(shape)


def int8_error_bound(original: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Per element, the largest error the bound above allows (float64, ``original``'s shape)."""
    lead, rows, channels = _grid(tuple(original.shape))
    x = original.detach().to("cpu", torch.float64).reshape(lead, rows, channels)
    scale = x.abs().amax(dim=1, keepdim=True) / QMAX if x.numel() else torch.zeros(lead, 1, channels)
    d = decoded.detach().cpu()
    # the wider of the dtype's two spacings around x' (they differ at a power of two)
    up = (torch.nextafter(d, torch.full_like(d, math.inf)) - d).to(torch.float64).abs()
    down = (d - torch.nextafter(d, torch.full_like(d, -math.inf))).to(torch.float64).abs()
    ulp = torch.maximum(up, down)
    bound = scale * (0.5 + 2**-15) + ulp.reshape(lead, rows, channels) / 2
    return bound.reshape(original.shape)


INT8 = CodecSpec(
    "int8",
    encode=encode,
    decode=decode,
    lossless=False,
    dtypes=SUPPORTED,
    description="Lossy: 8-bit values with a float32 scale per channel (last dimension); "
    "|error| <= scale/2 + half an ulp of the chunk's dtype per element.",
)
