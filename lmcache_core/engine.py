"""The cache engine: stores KV chunks for token sequences across tiered storage locations.

Locations come from backend plugins, fastest tier first (``LocalCPUBackend`` in front of
``LocalDiskBackend``). A store lands in the fastest tier and is written behind into slower ones
without blocking the caller; a retrieve that misses the fast tier but hits a slower one promotes
the chunk. Every change at every location is announced to subscribers (``subscribe``), which is
how the controller worker keeps the controller's index current.

Codecs (``lmcache_core.codecs``, registered by plugins) are applied here, between the caller and
the backends: a location named in ``store_codecs`` receives chunks encoded, ``compress`` and
``decompress`` re-encode what a location holds in place, and every read decodes, so callers
always get the chunk's tensor as it was stored (bit for bit through a lossless codec).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
import torch

from lmcache_core.codecs import ChunkEncoding, CodecError, CodecSpec, UnknownCodecError, decode_chunk, encode_chunk
from lmcache_core.config import LMCacheSettings
from lmcache_core.errors import BackendError, ConfigError, UnknownLocationError
from lmcache_core.events import EventBus, Subscriber
from lmcache_core.keys import ChunkKey, ChunkSpan, KeyMaker, TokenHasher, TokenSequence
from lmcache_core.plugins import backend_specs, codec_specs, get_plugin_manager
from lmcache_core.storage import ChunkView, StorageBackend

if TYPE_CHECKING:
    from lmcache_core.p2p.client import TransferResult
    from lmcache_core.worker import WorkerHandle

log = logging.getLogger(__name__)

ChunkSink = Callable[[ChunkSpan, torch.Tensor], None]
ChunkSource = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class EngineMetadata:
    """Which model shard an engine caches for; part of every chunk key."""

    model_name: str
    world_size: int = 1
    worker_id: int = 0
    kv_dtype: str = "bfloat16"


class PrefixHold:
    """Chunk views of a stored prefix that ``CacheEngine.hold`` keeps from eviction and reuse."""

    def __init__(self, held: list[tuple[ChunkSpan, ChunkView]], locations: list[str]) -> None:
        self.chunks = held
        #: where each held chunk was found (before any promotion)
        self.locations = locations

    @property
    def num_tokens(self) -> int:
        """Tokens covered, from the first token on."""
        return self.chunks[-1][0].end if self.chunks else 0

    def release(self) -> None:
        """Let the chunks go (idempotent)."""
        held, self.chunks = self.chunks, []
        for _, view in held:
            view.release()


class CacheEngine:
    """Stores and retrieves KV chunks by token prefix, over the enabled storage locations.

    >>> engine = CacheEngine(load_settings(), EngineMetadata("my-model"))  # doctest: +SKIP
    >>> engine.store(tokens, kv)          # kv: [layers, 2, len(tokens), hidden]   # doctest: +SKIP
    >>> engine.lookup(tokens)                                                       # doctest: +SKIP
    """

    def __init__(
        self,
        settings: LMCacheSettings,
        metadata: EngineMetadata,
        pm: pluggy.PluginManager | None = None,
        *,
        start_worker: bool | None = None,
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.pm = pm if pm is not None else get_plugin_manager()
        self.hasher = TokenHasher(settings.chunk_size, settings.namespace)
        self.keys = KeyMaker(
            metadata.model_name, metadata.world_size, metadata.worker_id, metadata.kv_dtype
        )
        self._shard = (metadata.model_name, metadata.world_size, metadata.worker_id, metadata.kv_dtype)
        self.events = EventBus()
        self.backends: dict[str, StorageBackend] = {}
        self._worker: WorkerHandle | None = None
        self._tiers: list[StorageBackend] = []
        self.codecs: dict[str, CodecSpec] = codec_specs(self.pm)
        #: per location, the codec its chunks are stored with (``store_codecs``)
        self._store_codecs: dict[str, CodecSpec] = {}
        #: set by a worker serving the peer channel (``enable_p2p``): see ``fetch_from_peers``
        self.peer_fetch: Callable[[TokenSequence], TransferResult | None] | None = None
        try:
            for location, spec in backend_specs(self.pm).items():
                if spec.enabled(settings):
                    sink = self.events.sink(location, self.owns)
                    self.backends[location] = spec.factory(settings, sink)
            self._tiers = list(self.backends.values())
            self._store_codecs = self._resolve_store_codecs(settings.store_codecs)
            if start_worker if start_worker is not None else settings.enable_controller:
                from lmcache_core.worker import start_worker as start

                self._worker = start(self)
        except BaseException:
            self.close()
            raise

    # --- properties --------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        return self.hasher.chunk_size

    @property
    def locations(self) -> list[str]:
        """Enabled location names, fastest first."""
        return list(self.backends)

    def owns(self, key: ChunkKey) -> bool:
        """Whether ``key`` belongs to this engine's model shard (model, world size, rank, dtype).

        A location may hold other chunks (a disk directory another model wrote into); they are
        never announced nor listed in the inventory, so the controller never credits this
        instance with chunks it cannot load.
        """
        return (key.model_name, key.world_size, key.worker_id, key.kv_dtype) == self._shard

    def backend(self, location: str) -> StorageBackend:
        """The backend at ``location``; ``UnknownLocationError`` lists the enabled ones."""
        try:
            return self.backends[location]
        except KeyError:
            raise UnknownLocationError(location, self.locations) from None

    def codec(self, name: str) -> CodecSpec:
        """The codec registered as ``name``; ``UnknownCodecError`` lists the installed ones."""
        try:
            return self.codecs[name]
        except KeyError:
            raise UnknownCodecError(name, list(self.codecs)) from None

    def _resolve_store_codecs(self, wanted: dict[str, str]) -> dict[str, CodecSpec]:
        resolved = {}
        for location, name in wanted.items():
            if location not in self.backends:
                raise ConfigError(
                    f"store_codecs names location '{location}', which is not enabled; "
                    f"enabled: {', '.join(self.locations) or '(none)'}"
                )
            if not self.backends[location].stores_encoded:
                raise ConfigError(f"store_codecs: location '{location}' cannot store encoded chunks")
            try:
                resolved[location] = self.codec(name)
            except UnknownCodecError as exc:
                raise ConfigError(f"store_codecs for '{location}': {exc}") from None
        return resolved

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Receive every admit/evict/clear at every location, in order; returns an unsubscriber."""
        return self.events.subscribe(callback)

    # --- storing -----------------------------------------------------------------------------
    def store(
        self,
        tokens: TokenSequence,
        kv: torch.Tensor | None = None,
        *,
        token_dim: int = 2,
        chunk_fn: ChunkSource | None = None,
    ) -> int:
        """Store every chunk of ``tokens`` that is not stored yet; returns the tokens newly stored.

        Give ``kv`` (a tensor whose dimension ``token_dim`` has ``len(tokens)`` entries) or
        ``chunk_fn(start, end)`` returning one chunk's tensor, called only for missing chunks.
        """
        if (kv is None) == (chunk_fn is None):
            raise ValueError("store() needs exactly one of kv= or chunk_fn=")
        if kv is not None and kv.shape[token_dim] != len(tokens):
            raise ValueError(
                f"kv has {kv.shape[token_dim]} entries in dimension {token_dim} "
                f"but there are {len(tokens)} tokens; pass token_dim= for another layout"
            )
        if kv is not None:
            source: ChunkSource = lambda start, end: kv.narrow(token_dim, start, end - start)  # noqa: E731
        else:
            assert chunk_fn is not None
            source = chunk_fn
        return sum(self._store_span(span, source) for span in self.hasher.spans(tokens))

    def store_chunks(self, chunks: Iterable[tuple[ChunkSpan, torch.Tensor]]) -> int:
        """Store chunks already cut (spans from ``hasher.spans``); returns the tokens newly stored.

        What a caller that copies chunks out ahead of time uses (``missing_spans`` first).
        """
        return sum(self._store_span(span, lambda *_: data) for span, data in chunks)

    def _store_span(self, span: ChunkSpan, source: ChunkSource) -> int:
        if not self._tiers:
            return 0
        key = self.keys.key(span.chunk_hash)
        missing = [b for b in self._tiers if not b.contains(key)]
        if not missing:
            return 0
        self._put_tiers(key, source(span.start, span.end), span.num_tokens, missing)
        return span.num_tokens

    def _put_tiers(
        self, key: ChunkKey, data: torch.Tensor, num_tokens: int, targets: list[StorageBackend]
    ) -> None:
        """Copy into synchronous tiers now; write-behind tiers read a resident copy later."""
        for backend in targets:
            try:
                if not backend.writes_behind:
                    payload, encoding = self._form_for(backend, data, None)
                    _put(backend, key, payload, num_tokens, encoding)
                    continue
                view = self._resident_view(key)
                if view is not None:
                    try:
                        payload, encoding = self._form_for(backend, view.tensor, view.encoding)
                    except BaseException:
                        view.release()
                        raise
                    if payload is view.tensor:  # held until the slow tier has written it
                        _put(backend, key, payload, num_tokens, encoding, on_done=view.release)
                        continue
                    view.release()  # the payload is a fresh tensor of its own
                else:
                    payload, encoding = self._form_for(backend, data, None)
                    if payload is data:  # the caller may reuse its memory, so give a copy
                        payload = data.clone(memory_format=torch.contiguous_format)
                _put(backend, key, payload, num_tokens, encoding)
            except (BackendError, CodecError) as exc:
                log.warning("storing a chunk at %s failed: %s", backend.location, exc)

    def _form_for(
        self, backend: StorageBackend, tensor: torch.Tensor, encoding: ChunkEncoding | None
    ) -> tuple[torch.Tensor, ChunkEncoding | None]:
        """The form a chunk is stored in at ``backend``: its ``store_codecs`` codec when it has
        one, else the form it comes in (decoded for a backend that keeps no encodings)."""
        want = self._store_codecs.get(backend.location)
        if want is not None:
            if encoding is not None and encoding.codec == want.name:
                return tensor, encoding
            raw = tensor if encoding is None else self._decode(tensor, encoding)
            return _encoded_if_smaller(want, raw)
        if encoding is None or backend.stores_encoded:
            return tensor, encoding
        return self._decode(tensor, encoding), None

    def _decode(self, payload: torch.Tensor, encoding: ChunkEncoding) -> torch.Tensor:
        return decode_chunk(self.codec(encoding.codec), payload, encoding)

    def _resident_view(self, key: ChunkKey) -> ChunkView | None:
        for backend in self._tiers:
            if not backend.writes_behind:
                view = backend.get(key)
                if view is not None:
                    return view
        return None

    # --- reading -----------------------------------------------------------------------------
    def lookup(self, tokens: TokenSequence) -> int:
        """Tokens in the longest stored prefix of ``tokens`` (any tier); reads no data."""
        found = 0
        for span in self.hasher.spans(tokens):
            key = self.keys.key(span.chunk_hash)
            if not any(backend.contains(key) for backend in self._tiers):
                break
            found = span.end
        return found

    def retrieve(self, tokens: TokenSequence, sink: ChunkSink) -> int:
        """Deliver the longest stored prefix chunk by chunk; returns the tokens delivered.

        ``sink(span, tensor)`` is called in token order; ``tensor`` is valid only during the
        call. A hit in a slower tier is promoted into the fastest synchronous tier.
        """
        delivered = 0
        for span, view, _ in self._stored_prefix(tokens):
            try:
                sink(span, view.tensor)
            finally:
                view.release()
            delivered = span.end
        return delivered

    def _stored_prefix(self, tokens: TokenSequence) -> Iterator[tuple[ChunkSpan, ChunkView, int]]:
        """Views of the longest stored prefix, chunk by chunk, with the tier each was found in;
        a hit in a slower tier is promoted first. The caller releases every view it gets."""
        for span in self.hasher.spans(tokens):
            key = self.keys.key(span.chunk_hash)
            view, tier = self._find(key)
            if view is None:
                return
            if tier > 0:
                try:
                    self._promote(key, view, tier)
                except BaseException:
                    view.release()
                    raise
            if view.encoding is not None:
                try:
                    with view:
                        view = ChunkView(self._decode(view.tensor, view.encoding), view.num_tokens)
                except CodecError as exc:
                    log.warning(
                        "a chunk at %s cannot be decoded: %s", self._tiers[tier].location, exc
                    )
                    return
            yield span, view, tier

    def _find(self, key: ChunkKey) -> tuple[ChunkView | None, int]:
        for tier, backend in enumerate(self._tiers):
            try:
                view = backend.get(key)
            except BackendError as exc:
                log.warning("reading a chunk at %s failed: %s", backend.location, exc)
                continue
            if view is not None:
                return view, tier
        return None, -1

    def _promote(self, key: ChunkKey, view: ChunkView, found_tier: int) -> None:
        for backend in self._tiers[:found_tier]:
            if not backend.writes_behind:
                try:
                    payload, encoding = self._form_for(backend, view.tensor, view.encoding)
                    _put(backend, key, payload, view.num_tokens, encoding)
                except (BackendError, CodecError) as exc:
                    log.warning("promoting a chunk into %s failed: %s", backend.location, exc)
                return

    def hold(self, tokens: TokenSequence) -> "PrefixHold":
        """Views of the longest stored prefix, kept until ``PrefixHold.release()``.

        While held, the chunks cannot be evicted and their memory is not reused, even if a
        ``clear`` or ``remove`` drops them meanwhile (that still counts and announces them as
        removed). A hit in a slower tier is promoted, as ``retrieve`` does. An encoded chunk is
        decoded now: the hold keeps the decoded tensor (the backend's copy is not held).
        """
        held: list[tuple[ChunkSpan, ChunkView]] = []
        locations: list[str] = []
        try:
            for span, view, tier in self._stored_prefix(tokens):
                held.append((span, view))
                locations.append(self._tiers[tier].location)
        except BaseException:
            for _, view in held:
                view.release()
            raise
        return PrefixHold(held, locations)

    def view_chunk(self, chunk_hash: int) -> ChunkView | None:
        """A view of this shard's chunk ``chunk_hash`` from the fastest tier holding it (no
        promotion); the caller releases it. What the peer channel serves."""
        return self._find(self.keys.key(chunk_hash))[0]

    def store_received(
        self, chunk_hash: int, num_tokens: int, data: torch.Tensor, location: str | None = None
    ) -> int:
        """Store a whole chunk that came from elsewhere (a peer): in every tier lacking it, or
        at ``location`` only; returns the tokens newly stored."""
        span = ChunkSpan(chunk_hash, 0, num_tokens)
        if location is None:
            return self.store_chunks([(span, data)])
        key = self.keys.key(chunk_hash)
        backend = self.backend(location)
        if backend.contains(key):
            return 0
        self._put_tiers(key, data, num_tokens, [backend])
        return num_tokens

    def fetch_from_peers(self, tokens: TokenSequence) -> "TransferResult | None":
        """With ``enable_p2p`` and a worker: fetch the part of the longest prefix of ``tokens``
        that a peer holds and this engine lacks, into its tiers (which announce them); returns
        what moved, from which peer (``tokens``, ``bytes``, ``error`` if it stopped early), or
        None without P2P or when no peer holds more. Never raises for a peer's failure: what
        did not arrive whole and checked is simply not stored, and the caller computes it."""
        fetch = self.peer_fetch
        if fetch is None:
            return None
        return fetch(tokens)

    def missing_spans(self, tokens: TokenSequence) -> list[ChunkSpan]:
        """Chunks of ``tokens`` that at least one location lacks (what ``store`` would write)."""
        return [
            span
            for span in self.hasher.spans(tokens)
            if not all(b.contains(self.keys.key(span.chunk_hash)) for b in self._tiers)
        ]

    def retrieve_tensor(
        self, tokens: TokenSequence, token_dim: int = 2
    ) -> tuple[int, torch.Tensor | None]:
        """The longest stored prefix as one tensor (a copy), concatenated along ``token_dim``."""
        parts: list[torch.Tensor] = []
        count = self.retrieve(tokens, lambda span, tensor: parts.append(tensor.clone()))
        if not parts:
            return 0, None
        return count, torch.cat(parts, dim=token_dim)

    # --- removing and pinning ----------------------------------------------------------------
    def _chunks_of(self, tokens: TokenSequence | None, location: str | None) -> list[tuple[ChunkKey, int]]:
        """Keys and token counts of the chunks of ``tokens``; None: every chunk at ``location``."""
        if tokens is None:
            if location is None:
                raise ValueError("give tokens, or a location to act on every chunk of")
            return self.inventory_at(location)
        return [(self.keys.key(span.chunk_hash), span.num_tokens) for span in self.hasher.spans(tokens)]

    def _each_chunk(
        self, tokens: TokenSequence | None, action: Callable[[StorageBackend, ChunkKey], Any],
        location: str | None = None,
    ) -> int:
        """Apply ``action`` to every chunk at every tier (or at ``location`` only); count tokens
        of chunks it succeeded on."""
        tiers = self._tiers if location is None else [self.backend(location)]
        total = 0
        for key, num_tokens in self._chunks_of(tokens, location):
            results = [action(backend, key) for backend in tiers]
            if any(results):
                total += num_tokens
        return total

    def remove(self, tokens: TokenSequence) -> int:
        """Remove every chunk of ``tokens`` from every location; returns the tokens removed."""
        return self._each_chunk(tokens, lambda backend, key: backend.remove(key))

    def pin(self, tokens: TokenSequence | None, location: str | None = None) -> int:
        """Protect the chunks of ``tokens`` from eviction everywhere (or at ``location``; None
        tokens: every chunk there); returns the tokens pinned."""
        return self._each_chunk(tokens, lambda backend, key: backend.pin(key), location)

    def unpin(self, tokens: TokenSequence | None, location: str | None = None) -> int:
        """Undo ``pin``; returns the tokens unpinned."""
        return self._each_chunk(tokens, lambda backend, key: backend.unpin(key), location)

    def move(
        self, source: str, target: str, tokens: TokenSequence | None = None, *,
        should_copy: bool = False, timeout: float | None = None,
    ) -> int:
        """Put the chunks of ``tokens`` (None: every chunk of this shard) held at ``source`` into
        ``target``, then remove them from ``source`` unless ``should_copy``; returns the tokens of
        the chunks now at ``target``.

        A chunk leaves ``source`` only once ``target`` holds it (write-behind targets are
        flushed first, within ``timeout``), so a full target or a failed write loses nothing: the
        chunk stays where it was and is not counted. Pins do not travel with a chunk.
        """
        src, dst = self.backend(source), self.backend(target)
        if src is dst:
            raise ValueError(f"cannot move chunks from '{source}' to itself")
        chunks = [(key, n) for key, n in self._chunks_of(tokens, source) if src.contains(key)]
        for key, _ in chunks:
            if dst.contains(key):
                continue
            view = src.get(key)
            if view is None:
                continue  # evicted meanwhile
            try:  # the view keeps the source's memory valid until the target has stored it
                dst.put(key, view.tensor, view.num_tokens, on_done=view.release)
            except BackendError as exc:
                log.warning("moving a chunk into %s failed: %s", target, exc)
        dst.flush(timeout)
        moved = 0
        for key, num_tokens in chunks:
            if dst.contains(key):
                moved += num_tokens
                if not should_copy:
                    src.remove(key)
        return moved

    # --- re-encoding in place ----------------------------------------------------------------
    def compress(self, location: str, method: str, tokens: TokenSequence | None = None) -> int:
        """Re-encode the chunks at ``location`` (only those of ``tokens`` when given) with codec
        ``method``, in place; returns the tokens of the chunks re-encoded.

        Chunks already in ``method``, chunks it cannot encode (a dtype it does not accept, a
        value it cannot represent) and chunks it would not make smaller are left as they are. Keys, token counts and pins stay, so ``lookup`` (and the controller's index)
        answer as before; reads decode transparently.
        """
        spec = self.codec(method)

        def compressed(payload: torch.Tensor, encoding: ChunkEncoding | None) -> _Recoded | None:
            if encoding is not None and encoding.codec == spec.name:
                return None
            raw = payload if encoding is None else self._decode(payload, encoding)
            if not spec.supports(raw.dtype):
                log.warning("compress %s: leaves a %s chunk as it is", spec.name, raw.dtype)
                return None
            try:
                new = _encoded_if_smaller(spec, raw)
            except CodecError as exc:  # e.g. int8 given inf: this chunk stays as it is
                log.warning("compress %s: leaves a chunk as it is: %s", spec.name, exc)
                return None
            return new if new[1] is not None else None

        return self._recode(location, tokens, compressed)

    def decompress(self, location: str, method: str, tokens: TokenSequence | None = None) -> int:
        """Store the chunks at ``location`` that codec ``method`` encoded as they are again (only
        those of ``tokens`` when given); returns their tokens. A lossy codec's loss stays."""
        spec = self.codec(method)

        def decompressed(payload: torch.Tensor, encoding: ChunkEncoding | None) -> _Recoded | None:
            if encoding is None or encoding.codec != spec.name:
                return None
            return decode_chunk(spec, payload, encoding), None

        return self._recode(location, tokens, decompressed)

    def _recode(
        self,
        location: str,
        tokens: TokenSequence | None,
        recode: Callable[[torch.Tensor, ChunkEncoding | None], "_Recoded | None"],
    ) -> int:
        """Replace each chunk at ``location`` by ``recode(payload, encoding)`` (None: keep it)."""
        backend = self.backend(location)
        if not backend.stores_encoded:
            raise CodecError(f"location '{location}' cannot store encoded chunks")
        backend.flush()  # queued writes land first, so they are re-encoded too
        if tokens is None:
            chunks = self.inventory_at(location)
        else:
            chunks = [(self.keys.key(s.chunk_hash), s.num_tokens) for s in self.hasher.spans(tokens)]
        done = 0
        for key, num_tokens in chunks:
            view = backend.get(key)
            if view is None:
                continue
            with view:
                new = recode(view.tensor, view.encoding)
            if new is not None and backend.replace(key, new[0], new[1]):
                done += num_tokens
        return done

    def clear(self, location: str | None = None) -> int:
        """Empty one location (or all when None); returns the tokens removed (summed per location)."""
        if location is not None:
            return self.backend(location).clear()
        return sum(backend.clear() for backend in self._tiers)

    # --- introspection and lifecycle ---------------------------------------------------------
    def inventory(self) -> dict[str, list[tuple[ChunkKey, int]]]:
        """Every stored chunk of this engine's shard with its token count, per location."""
        return {location: self.inventory_at(location) for location in self.backends}

    def inventory_at(self, location: str) -> list[tuple[ChunkKey, int]]:
        """Every stored chunk of this engine's shard at ``location`` (see ``owns``)."""
        return [(key, n) for key, n in self.backend(location).inventory() if self.owns(key)]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {location: backend.stats() for location, backend in self.backends.items()}

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for write-behind tiers to finish queued writes; True when all are done."""
        done = [backend.flush(timeout) for backend in self._tiers]  # every tier, even after a False
        return all(done)

    def close(self) -> None:
        """Stop the worker, then close locations slowest first (they may read faster tiers)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        backends, self.backends = self.backends, {}
        self._tiers = []
        for backend in reversed(list(backends.values())):
            try:
                backend.close()
            except Exception:  # one broken backend must not keep the others open
                log.exception("closing %s failed", backend.location)

    def __enter__(self) -> "CacheEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: a chunk's new form: a payload and its encoding, or the raw tensor and None
_Recoded = tuple[torch.Tensor, ChunkEncoding | None]


def _encoded_if_smaller(spec: CodecSpec, raw: torch.Tensor) -> _Recoded:
    """``raw`` encoded with ``spec``, or ``raw`` itself (and None) when that saves no bytes."""
    payload, encoding = encode_chunk(spec, raw)
    if payload.numel() >= raw.numel() * raw.element_size():
        return raw, None
    return payload, encoding


def _put(
    backend: StorageBackend,
    key: ChunkKey,
    data: torch.Tensor,
    num_tokens: int,
    encoding: ChunkEncoding | None,
    on_done: Callable[[], None] | None = None,
) -> bool:
    """``backend.put``, passing ``encoding`` only when there is one (backends that keep no
    encodings never see the argument)."""
    if encoding is None:
        return backend.put(key, data, num_tokens, on_done=on_done)
    return backend.put(key, data, num_tokens, on_done=on_done, encoding=encoding)  # type: ignore[call-arg]
