"""``zstd``: lossless. The chunk's bytes, split into byte planes, compressed with Zstandard.

A tensor of ``k``-byte elements is stored as ``k`` planes (every element's first byte, then
every second byte, ...) before compression: in float KV the planes of sign and exponent bits
repeat a few values and compress well, while the low mantissa bytes are close to random, so
splitting them (what Blosc calls shuffling) gains several times what compressing the
interleaved bytes gains. Decoding restores the bytes exactly, for every dtype.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import zstandard

from lmcache_core.codecs import CodecError, CodecSpec, payload_bytes

#: Zstandard's fastest regular level: chunks are encoded on the serving path
LEVEL = 1

_local = threading.local()  # compression contexts are not thread-safe: one per thread


def _compressor() -> zstandard.ZstdCompressor:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=LEVEL)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def encode(tensor: torch.Tensor) -> torch.Tensor:
    """The chunk's bytes in byte planes, compressed: a 1-D uint8 payload."""
    raw = _raw_bytes(tensor)
    width = tensor.element_size()
    if width > 1:  # numpy's strided copy is several times faster than torch's for uint8
        raw = np.ascontiguousarray(raw.reshape(-1, width).T)
    compressed = _compressor().compress(raw)
    return torch.frombuffer(bytearray(compressed), dtype=torch.uint8)


def decode(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor ``encode`` compressed, bit for bit."""
    width = dtype.itemsize
    nbytes = math.prod(shape) * width
    planes = np.empty(nbytes, dtype=np.uint8)
    target = memoryview(planes)
    try:
        with _decompressor().stream_reader(payload_bytes(payload)) as reader:
            filled = 0
            while filled < nbytes:
                n = reader.readinto(target[filled:])
                if not n:
                    break
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload does not decompress: {exc}") from exc
    if filled != nbytes or extra:
        raise CodecError(f"zstd payload holds {'more' if extra else filled} bytes, expected {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if width > 1:
        by_plane = planes.reshape(width, -1)
        raw = np.empty((by_plane.shape[1], width), dtype=np.uint8)
        for i in range(width):  # one plane at a time: faster than a transposed copy
            raw[:, i] = by_plane[i]
    else:
        raw = planes
    return torch.from_numpy(raw).reshape(-1).view(dtype).reshape(shape)


ZSTD = CodecSpec(
    "zstd",
    encode=encode,
    decode=decode,
    lossless=True,
    dtypes=None,
    description=f"Lossless: the chunk's bytes in byte planes, Zstandard level {LEVEL}; any dtype, bit-exact.",
)
