"""The on-disk format of one chunk file: a small self-describing header, then the raw bytes.

Layout (all integers little-endian), format versions 1 and 2::

    offset  size  field
         0     8  magic            b"LMCKVCH\\x00"
         8     2  format version   1
        10     2  header length    bytes before the data (a multiple of 64)
        12     8  data length      bytes of tensor data after the header
        20     8  num_tokens       tokens the chunk holds
        28     8  data checksum    xxh3_64 of the data bytes, seed 0
        36     1  ndim             number of dimensions
        37     1  dtype length     bytes of the dtype name
        38     2  key length       bytes of the key string
        40     8  header checksum  xxh3_64 of every other header byte (padding included)
        48        shape            ndim signed 64-bit integers
                  dtype name       ASCII, torch's name without "torch." ("bfloat16")
                  key              UTF-8, ``ChunkKey.to_string()``
                  encoding         version 2 only, see below
                  zero padding     up to the header length

A chunk stored as it is gets a version 1 file (what every earlier release wrote and reads).
A chunk encoded by a codec (``lmcache_core.codecs``) gets version 2: the data is the codec's
payload (shape and dtype above describe it: ``(n,)``, ``uint8``) and the encoding section says
how to decode it::

                     1  codec name length
                        codec name          ASCII ("zstd")
                     1  dtype length
                        original dtype name ASCII
                     1  original ndim
                        original shape      ndim signed 64-bit integers

The header is checksummed on its own so a restart can trust a file after reading only its
first bytes; the data checksum is verified on every read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
import xxhash

from lmcache_core.codecs import ChunkEncoding
from lmcache_core.errors import BackendError
from lmcache_core.keys import ChunkKey

MAGIC = b"LMCKVCH\x00"
FORMAT_VERSION = 1
#: the version of files holding an encoded chunk (a version 1 header plus the encoding)
ENCODED_FORMAT_VERSION = 2
HEADER_ALIGN = 64
#: the final extension of a chunk file; temporary files end in TEMP_SUFFIX instead
CHUNK_SUFFIX = ".kvchunk"
TEMP_SUFFIX = ".tmp"
#: bytes read and hashed at a time: small enough to stay in the CPU cache in between
READ_SLICE = 256 * 1024
#: keep file names well under the usual 255-byte limit; longer keys get a hashed name
MAX_NAME_BYTES = 200

_FIXED = struct.Struct("<8sHHQQQBBHQ")
_CHECKSUM_OFFSET = 40  # where the header checksum sits inside _FIXED
assert _FIXED.size == 48


class CorruptChunkError(BackendError):
    """A chunk file that cannot be trusted: bad magic, checksum, length or key."""


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """What a chunk file's header says about the data that follows it."""

    key: ChunkKey
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int
    data_length: int
    data_checksum: int
    header_length: int
    encoding: ChunkEncoding | None = None

    @property
    def file_size(self) -> int:
        return self.header_length + self.data_length


def file_name(key: ChunkKey) -> str:
    """The chunk file's name: the key's text form, hashed only when it would be too long."""
    text = key.to_string()
    if len(text.encode("utf-8")) <= MAX_NAME_BYTES:
        return text + CHUNK_SUFFIX
    # the header carries the full key, so a shortened name loses nothing
    digest = xxhash.xxh3_128_hexdigest(text.encode("utf-8"))
    prefix = text.encode("utf-8")[:100].decode("utf-8", errors="ignore")
    return f"{prefix}~{digest}{CHUNK_SUFFIX}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name``; ``CorruptChunkError`` when torch has no such dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptChunkError(f"unknown dtype {name!r} in chunk header")
    return dtype


def encode_header(
    key: ChunkKey,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    num_tokens: int,
    data_length: int,
    data_checksum: int,
    encoding: ChunkEncoding | None = None,
) -> bytes:
    """The header bytes for a chunk (padded to a multiple of 64); version 2 with ``encoding``."""
    dtype_bytes = dtype_name(dtype).encode("ascii")
    key_bytes = key.to_string().encode("utf-8")
    shape_bytes = struct.pack(f"<{len(shape)}q", *shape)
    variable = shape_bytes + dtype_bytes + key_bytes
    if encoding is not None:
        variable += _encode_encoding(key, encoding)
    unpadded = _FIXED.size + len(variable)
    header_length = -(-unpadded // HEADER_ALIGN) * HEADER_ALIGN
    if len(shape) > 255 or len(key_bytes) > 0xFFFF or header_length > 0xFFFF:
        raise BackendError(f"chunk {key.to_string()!r} has a shape or key too large to store")
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION if encoding is None else ENCODED_FORMAT_VERSION,
        header_length,
        data_length,
        num_tokens,
        data_checksum,
        len(shape),
        len(dtype_bytes),
        len(key_bytes),
        0,
    )
    header = bytearray(fixed + variable + bytes(header_length - unpadded))
    struct.pack_into("<Q", header, _CHECKSUM_OFFSET, xxhash.xxh3_64_intdigest(bytes(header)))
    return bytes(header)


def read_header(f: BinaryIO, file_size: int) -> ChunkHeader:
    """Read and verify a header from the start of ``f``; ``CorruptChunkError`` when it is bad.

    ``file_size`` lets a truncated file (a torn write) be caught without reading the data.
    """
    fixed = _read_exact(f, _FIXED.size)
    magic, version, header_length, data_length, num_tokens, data_checksum, ndim, dlen, klen, hsum = (
        _FIXED.unpack(fixed)
    )
    if magic != MAGIC:
        raise CorruptChunkError("not a chunk file (bad magic)")
    if version not in (FORMAT_VERSION, ENCODED_FORMAT_VERSION):
        raise CorruptChunkError(f"unsupported chunk format version {version}")
    variable_length = 8 * ndim + dlen + klen
    if header_length < _FIXED.size + variable_length or header_length % HEADER_ALIGN:
        raise CorruptChunkError(f"bad header length {header_length}")
    rest = _read_exact(f, header_length - _FIXED.size)
    zeroed = bytearray(fixed + rest)
    struct.pack_into("<Q", zeroed, _CHECKSUM_OFFSET, 0)
    if xxhash.xxh3_64_intdigest(bytes(zeroed)) != hsum:
        raise CorruptChunkError("header checksum mismatch")
    shape = struct.unpack_from(f"<{ndim}q", rest, 0)
    name = rest[8 * ndim : 8 * ndim + dlen].decode("ascii", errors="replace")
    key_text = rest[8 * ndim + dlen : 8 * ndim + dlen + klen].decode("utf-8", errors="replace")
    encoding = None
    if version == ENCODED_FORMAT_VERSION:
        encoding = _decode_encoding(rest, 8 * ndim + dlen + klen)
    dtype = dtype_from_name(name)
    try:
        key = ChunkKey.from_string(key_text)
    except ValueError as exc:
        raise CorruptChunkError(f"bad key {key_text!r} in chunk header") from exc
    numel = 1
    for dim in shape:
        if dim < 0:
            raise CorruptChunkError(f"negative dimension in shape {shape}")
        numel *= dim
    if numel * dtype.itemsize != data_length:
        raise CorruptChunkError(
            f"shape {shape} of {name} needs {numel * dtype.itemsize} bytes, header says {data_length}"
        )
    if file_size != header_length + data_length:
        raise CorruptChunkError(
            f"file is {file_size} bytes, header says {header_length + data_length} (torn write?)"
        )
    return ChunkHeader(
        key, dtype, tuple(shape), num_tokens, data_length, data_checksum, header_length, encoding
    )


def _encode_encoding(key: ChunkKey, encoding: ChunkEncoding) -> bytes:
    codec = encoding.codec.encode("ascii", errors="replace")
    dtype = dtype_name(encoding.dtype).encode("ascii")
    shape = encoding.shape
    if len(codec) > 255 or len(shape) > 255:
        raise BackendError(f"chunk {key.to_string()!r} has a codec name or shape too long to store")
    return (
        bytes([len(codec)]) + codec + bytes([len(dtype)]) + dtype + bytes([len(shape)])
        + struct.pack(f"<{len(shape)}q", *shape)
    )


def _decode_encoding(rest: bytes, at: int) -> ChunkEncoding:
    """The encoding section of a version 2 header, starting ``at`` bytes into ``rest``."""
    try:
        clen = rest[at]
        codec = rest[at + 1 : at + 1 + clen].decode("ascii")
        at += 1 + clen
        dlen = rest[at]
        dtype = dtype_from_name(rest[at + 1 : at + 1 + dlen].decode("ascii"))
        at += 1 + dlen
        ndim = rest[at]
        shape = struct.unpack_from(f"<{ndim}q", rest, at + 1)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise CorruptChunkError(f"bad encoding section in chunk header: {exc}") from exc
    if not codec or any(dim < 0 for dim in shape):
        raise CorruptChunkError(f"bad encoding section in chunk header: {codec!r} {shape}")
    return ChunkEncoding(codec, dtype, tuple(shape))


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptChunkError(f"file ends inside the header ({len(data)} of {n} bytes)")
    return data


def read_data(f: BinaryIO, buffer: memoryview, expected_checksum: int) -> None:
    """Fill ``buffer`` from ``f`` and verify its xxh3_64; ``CorruptChunkError`` when it is short
    or differs.

    Reading and hashing go slice by slice so each slice is hashed while it is still in the CPU
    cache: about 10% faster than reading everything, then hashing it from memory.
    """
    hasher = xxhash.xxh3_64()
    total = len(buffer)
    for start in range(0, total, READ_SLICE):
        piece = buffer[start : start + READ_SLICE]
        filled = 0
        while filled < len(piece):
            n = f.readinto(piece[filled:])  # raw reads may return short
            if not n:
                raise CorruptChunkError(
                    f"file ends inside the data ({start + filled} of {total} bytes)"
                )
            filled += n
        hasher.update(piece)
    if hasher.intdigest() != expected_checksum:
        raise CorruptChunkError("data checksum mismatch")


def tensor_bytes(data: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """A CPU, contiguous version of ``data`` (no copy when it already is one) and its bytes.

    The tensor is returned too because the memoryview borrows its storage.
    """
    t = data.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8)  # bfloat16 and friends have no numpy dtype
    return t, memoryview(raw.numpy()).cast("B")


def empty_for(header: ChunkHeader) -> tuple[torch.Tensor, memoryview]:
    """A fresh tensor shaped by ``header`` and a writable view of its bytes.

    numpy allocates the memory because it asks for transparent huge pages on large arrays:
    filling a fresh 32 MiB torch.empty costs about 4x more page faults than the read itself.
    """
    raw = np.empty(header.data_length, dtype=np.uint8)
    tensor = torch.from_numpy(raw).view(header.dtype).reshape(header.shape)
    return tensor, memoryview(raw).cast("B")


def read_chunk(f: BinaryIO, key: ChunkKey) -> tuple[torch.Tensor, ChunkHeader]:
    """Read a whole chunk file opened unbuffered, checking that it holds ``key``, its header
    and its data checksum; ``CorruptChunkError`` when any check fails."""
    header = read_header(f, os.fstat(f.fileno()).st_size)
    if header.key != key:
        raise CorruptChunkError(f"file holds key {header.key.to_string()!r}")
    tensor, raw = empty_for(header)
    read_data(f, raw, header.data_checksum)
    return tensor, header
