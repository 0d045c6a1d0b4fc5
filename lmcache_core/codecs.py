"""Chunk codecs: named ways to store a chunk's tensor in fewer bytes, registered by plugins.

A codec turns a chunk's tensor into a *payload* (a 1-D ``uint8`` CPU tensor) and back. The
backend stores the payload together with a ``ChunkEncoding`` (codec name, the original dtype
and shape), so whoever reads the chunk later (another process, after a restart) knows how to
decode it. The engine encodes and decodes; backends only keep payloads and their encodings.

Codecs come from plugins through the ``lmcache_chunk_codecs`` hook; the core resolves names
(``plugins.codec_specs`` / ``plugins.resolve_codec``) and never imports a codec plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmcache_core.errors import LMCacheError, UnknownNameError

#: turns a chunk's tensor (any device, any strides) into a 1-D uint8 CPU payload
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
#: turns a payload back into a tensor of the given dtype and shape (on the CPU)
DecodeFn = Callable[[torch.Tensor, torch.dtype, tuple[int, ...]], torch.Tensor]


class CodecError(LMCacheError):
    """A codec cannot encode or decode a chunk (unsupported dtype, corrupt payload...)."""


class UnknownCodecError(CodecError, UnknownNameError):
    """A codec name that no loaded plugin registers."""

    what = "codec"
    none = "(none installed)"


@dataclass(frozen=True)
class ChunkEncoding:
    """How a stored chunk is encoded: recorded with the payload wherever it is kept."""

    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CodecSpec:
    """What a codec plugin registers through ``lmcache_chunk_codecs``.

    ``encode(tensor)`` returns a 1-D ``uint8`` CPU tensor; ``decode(payload, dtype, shape)``
    returns the tensor again (bit for bit when ``lossless``; within the bound that
    ``description`` states otherwise). ``dtypes`` lists the dtypes it accepts (None: any).
    """

    name: str
    encode: EncodeFn
    decode: DecodeFn
    lossless: bool
    dtypes: frozenset[torch.dtype] | None = None
    description: str = ""
    plugin: str = field(default="", compare=False)  # filled by the plugin manager

    def supports(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    def dtype_names(self) -> list[str]:
        """The accepted dtypes by name (``["any"]`` when every dtype is)."""
        if self.dtypes is None:
            return ["any"]
        return sorted(str(d).removeprefix("torch.") for d in self.dtypes)


def encode_chunk(spec: CodecSpec, tensor: torch.Tensor) -> tuple[torch.Tensor, ChunkEncoding]:
    """``tensor`` encoded with ``spec``: its payload and the encoding to store beside it."""
    if not spec.supports(tensor.dtype):
        raise CodecError(
            f"codec '{spec.name}' cannot encode {str(tensor.dtype).removeprefix('torch.')}; "
            f"it supports: {', '.join(spec.dtype_names())}"
        )
    try:
        payload = spec.encode(tensor)
    except CodecError:
        raise
    except Exception as exc:  # a plugin's failure becomes ours, with context
        raise CodecError(f"codec '{spec.name}' failed to encode a {tuple(tensor.shape)} chunk: {exc}") from exc
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.device.type != "cpu":
        raise CodecError(
            f"codec '{spec.name}' returned a {payload.dtype} tensor of {payload.dim()} dimensions "
            f"on {payload.device}; a payload is a 1-D uint8 CPU tensor"
        )
    return payload, ChunkEncoding(spec.name, tensor.dtype, tuple(tensor.shape))


def decode_chunk(spec: CodecSpec, payload: torch.Tensor, encoding: ChunkEncoding) -> torch.Tensor:
    """The tensor a payload encodes; ``CodecError`` when the codec fails or returns another shape."""
    if spec.name != encoding.codec:
        raise CodecError(f"chunk encoded with '{encoding.codec}' given to codec '{spec.name}'")
    try:
        tensor = spec.decode(payload, encoding.dtype, encoding.shape)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"codec '{spec.name}' failed to decode a chunk: {exc}") from exc
    if tensor.dtype != encoding.dtype or tuple(tensor.shape) != encoding.shape:
        raise CodecError(
            f"codec '{spec.name}' decoded a {tensor.dtype} {tuple(tensor.shape)} tensor; "
            f"the chunk was {encoding.dtype} {encoding.shape}"
        )
    return tensor


def payload_bytes(payload: torch.Tensor) -> memoryview:
    """The bytes of a 1-D uint8 CPU payload, without copying (for codecs and file writers)."""
    t = payload if payload.is_contiguous() else payload.contiguous()
    return memoryview(t.numpy()).cast("B")
