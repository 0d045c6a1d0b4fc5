"""``LMCacheConnectorV1``: vLLM's v1 KV connector backed by lmcache-core's ``CacheEngine``.

Load it either way::

    --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1",
        "kv_connector_module_path":"lmcache_connector_vllm.connector","kv_role":"kv_both"}'
    --kv-transfer-config '{"kv_connector":"LMCacheCoreConnectorV1","kv_role":"kv_both"}'

The second name is registered by this distribution's ``vllm.general_plugins`` entry point.

vLLM builds one connector per role. The WORKER one (in each worker process) owns the
``CacheEngine``: it moves tokens between vLLM's paged KV cache and canonical chunks
(``paged_kv``: any attention backend, KV layout, block size and device), stores every token of
a prompt when its prefill completes (``transfer``: copies queued on the device, stores in the
background) and loads hits token by token before the forward pass that needs them. The
SCHEDULER one owns no data; it asks the workers how many tokens are cached through a
``LookupClient`` (which also holds those chunks for the request, ``holds``) and plans loads,
saves and releases (``planning``).

Loads are synchronous (they finish in ``start_load_kv``, before the forward pass) and read the
chunks held since the lookup, so an eviction or a ``/clear`` in between does not fail the
request even under vLLM's default ``kv_load_failure_policy``. A load that fails all the same (a
hold expired, a chunk of another format) reports its blocks through
``get_block_ids_with_load_errors``; loaded KV is never wrong, because a chunk is only ever
copied from the same prefix hash, model, rank and dtype, and its shape is checked.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_core.config import LMCacheSettings, load_settings
from lmcache_core.engine import CacheEngine, EngineMetadata, PrefixHold
from lmcache_core.errors import ConfigError
from lmcache_core.plugins import get_plugin_manager

from lmcache_connector_vllm.cpu_attn_page import cpu_attention_page, cpu_attention_writer
from lmcache_connector_vllm.holds import HoldTable

from lmcache_connector_vllm.lookup_channel import (
    LookupChannelError,
    LookupClient,
    LookupServer,
    channel_path,
)
from lmcache_connector_vllm.paged_kv import TOKEN_DIM, KVLayoutError, PagedKV
from lmcache_connector_vllm.planning import (
    CachedRequest,
    LoadPlanner,
    LoadSpec,
    NewRequest,
    SaveSpec,
)
from lmcache_connector_vllm.transfer import BackgroundStorer, DeviceStager, SaveJob

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# a child of vLLM's logger, so records reach vLLM's handlers at vLLM's level
log = logging.getLogger("vllm.lmcache_connector_vllm")


@dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    """What the scheduler side sends the workers each step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)


def engine_metadata(vllm_config: "VllmConfig", rank: int) -> EngineMetadata:
    """Chunk-key fields from vLLM's config.

    ``kv_dtype`` is the KV cache dtype (and ``.mla`` for latent caches). Block size, attention
    backend, KV layout and device are not part of a key: chunks are stored in one canonical
    format (``paged_kv``), so any of them may differ between the instance that stores a chunk
    and the one that loads it.
    """
    model_config = vllm_config.model_config
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    dtype = str(model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else cache_dtype
    if model_config.use_mla:
        dtype += ".mla"
    parallel = vllm_config.parallel_config
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    return EngineMetadata(
        model_name=str(model_config.model),
        world_size=world_size,
        worker_id=rank,
        kv_dtype=dtype,
    )


def paged_kv_for(
    kv_caches: dict[str, torch.Tensor],
    vllm_config: "VllmConfig",
    kv_cache_config: "KVCacheConfig | None",
) -> PagedKV:
    """The token translator for the tensors vLLM registered, from what vLLM declares.

    The content split (keys and values of ``head_size`` each, or one latent / packed vector)
    comes from the cache group's ``AttentionSpec`` (the model config when there is none); the
    layout comes from the tensors' own strides. Anything else is a ``ConfigError`` naming the
    shape, the attention backend and the KV cache layout.
    """
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

    model_config = vllm_config.model_config
    groups = list(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else []
    backend, isa = _attention_backend(vllm_config, list(kv_caches))
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(
        vllm_config.cache_config, "kv_cache_layout", None
    )
    describe = f"attention backend {backend}, KV cache layout {layout or 'unknown'}"
    if len(groups) > 1:
        raise ConfigError(
            f"the lmcache connector supports one KV cache group; this model has {len(groups)} "
            f"(a hybrid model: {describe})"
        )
    spec = groups[0].kv_cache_spec if groups else None
    first = next(iter(kv_caches.values()), None)
    content = int(first.shape[-1]) if first is not None and first.dim() == 4 else -1
    if isinstance(spec, MLAAttentionSpec) or (spec is None and model_config.use_mla):
        planes, width = 1, content
    elif isinstance(spec, AttentionSpec) and spec.state_content_bytes is not None:
        planes, width = 1, content  # packed quantised content: opaque per token and head
    else:
        head = spec.head_size if isinstance(spec, AttentionSpec) else model_config.get_head_size()
        head_v = spec.head_size_v if isinstance(spec, AttentionSpec) else head
        if head != head_v:
            raise ConfigError(
                f"the lmcache connector needs equal key and value head sizes, got {head} and "
                f"{head_v} ({describe})"
            )
        planes, width = 2, head
    try:
        page, writer = None, None
        if backend == "CPU_ATTN" and first is not None and first.dim() == 4 and planes == 2:
            # its pages are packed by its own writer: measure where each token goes
            kv_cache_dtype = str(vllm_config.cache_config.cache_dtype)
            isa = isa or _cpu_isa(vllm_config, int(first.shape[2]), width)
            page = cpu_attention_page(
                block_tokens=int(first.shape[2]), heads=int(first.shape[1]), head_size=width,
                cache_dtype=first.dtype, compute_dtype=model_config.dtype,
                kv_cache_dtype=kv_cache_dtype, isa=isa,
                token_stride=first.stride(2), head_stride=first.stride(1),
            )
            writer = cpu_attention_writer(isa=isa, kv_cache_dtype=kv_cache_dtype)
        return PagedKV(
            kv_caches, int(vllm_config.cache_config.block_size), planes=planes, width=width,
            page=page, writer=writer, describe=describe,
        )
    except KVLayoutError as exc:
        raise ConfigError(str(exc)) from exc


def _attention_backend(vllm_config: "VllmConfig", layer_names: list[str]) -> tuple[str, str | None]:
    """The attention backend's name vLLM picked for these layers, and the CPU backend's ISA."""
    try:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    except Exception:  # vLLM without these helpers: fall back on the device
        layers = {}
    for layer in layers.values():
        try:
            return str(layer.get_attn_backend().get_name()), getattr(layer, "isa", None)
        except Exception:
            continue
    from vllm.platforms import current_platform

    return ("CPU_ATTN" if current_platform.is_cpu() else "unknown"), None


def _cpu_isa(vllm_config: "VllmConfig", block_tokens: int, head_size: int) -> str:
    """The instruction set CPU_ATTN picks for this cache (what its metadata builder sets)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(
        vllm_config.model_config.dtype, block_tokens, head_size, vllm_config.cache_config.cache_dtype
    )


def _worker_rank() -> int:
    """This worker's rank among the workers of one vLLM instance (0 when not distributed)."""
    try:
        from vllm.distributed.parallel_state import (
            get_pipeline_model_parallel_rank,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        tp = get_tensor_model_parallel_world_size()
        return get_pipeline_model_parallel_rank() * tp + get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError, RuntimeError):
        return 0


def _settings_for_rank(settings: LMCacheSettings, rank: int, world_size: int) -> LMCacheSettings:
    """One disk directory per rank: chunks of different ranks never share a directory."""
    disk = settings.local_disk_path
    if world_size == 1 or disk is None:
        return settings
    return settings.model_copy(update={"local_disk": str(disk / f"rank{rank}")})


def _load_settings() -> LMCacheSettings:
    # plugins' settings keys are only valid with the plugin manager that contributed them
    return load_settings(get_plugin_manager())


class LMCacheConnectorV1(KVConnectorBase_V1):
    """vLLM v1 KV connector storing prompt KV in lmcache-core's tiered cache.

    Configuration comes from ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*`` variables.
    """

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a save dropped by a preemption is only a future miss."""
        return False

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = _load_settings()
        self._block_size = int(vllm_config.cache_config.block_size)
        engine_id = str(self._kv_transfer_config.engine_id)
        self._instance_id = self._settings.lmcache_instance_id
        self._lookup_timeout = float(
            getattr(self._settings, "connector_vllm_lookup_timeout", 5.0)
        )
        parallel = vllm_config.parallel_config
        self._world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self._channels = [
            channel_path(engine_id, self._instance_id, r) for r in range(self._world_size)
        ]

        # worker side
        self._engine: CacheEngine | None = None
        self._server: LookupServer | None = None
        self._kv: PagedKV | None = None
        self._holds: HoldTable | None = None
        self._storer: BackgroundStorer | None = None
        self._stager: DeviceStager | None = None
        self._invalid_blocks: set[int] = set()
        self._failed_loads: set[str] = set()  # requests whose load failed in this step
        #: what fetches from peers brought in (enable_p2p), for logs and tests
        self.p2p_fetched_tokens = 0
        self.p2p_fetched_bytes = 0
        self._closed = False
        self._close_lock = threading.Lock()
        # scheduler side
        self._clients: list[LookupClient] = []
        self._planner: LoadPlanner | None = None
        self._loads_enabled = False

        if role == KVConnectorRole.WORKER:
            rank = _worker_rank()
            self._engine = CacheEngine(
                _settings_for_rank(self._settings, rank, self._world_size),
                engine_metadata(vllm_config, rank),
            )
            try:
                self._holds = HoldTable(float(getattr(self._settings, "connector_vllm_hold_seconds", 60.0)))
                self._storer = BackgroundStorer(
                    self._engine, int(getattr(self._settings, "connector_vllm_save_queue", 64))
                )
                self._server = LookupServer(self._channels[rank], self._engine_lookup)
            except BaseException:
                self.shutdown()
                raise
            # vLLM calls shutdown() on a clean exit; this also covers an interpreter exit
            atexit.register(self.shutdown)
            log.info(
                "lmcache connector worker %d: locations %s, chunk_size %d, lookups on %s",
                rank, self._engine.locations, self._engine.chunk_size, self._channels[rank],
            )
        else:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.info(
                    "lmcache connector: kv_load_failure_policy is %r; chunks promised by a "
                    "lookup are held until loaded, so evictions and clears do not fail "
                    "requests, but an unreadable chunk would (\"recompute\" avoids that)",
                    self._kv_transfer_config.kv_load_failure_policy,
                )
            self._clients = [LookupClient(p, self._lookup_timeout) for p in self._channels]
            # kv_role: a producer only stores, a consumer only loads, kv_both does both
            self._loads_enabled = bool(self._kv_transfer_config.is_kv_consumer)
            self._planner = LoadPlanner(
                self._block_size,
                self._lookup_all_ranks,
                save=bool(self._kv_transfer_config.is_kv_producer),
            )

    # ==============================================================================
    # Worker side
    # ==============================================================================
    def _engine_lookup(self, tokens: Any, req_id: str = "") -> int:
        """Tokens cached; with ``req_id``, those chunks are held for that request's load."""
        engine, holds = self._engine, self._holds
        if engine is None or holds is None:
            return 0
        if not req_id:
            return engine.lookup(tokens)
        held = holds.matching(req_id, tokens)
        if held is None:
            self._fetch_from_peers(engine, tokens, req_id)
            held = engine.hold(tokens)
            holds.put(req_id, tokens, held)
        return held.num_tokens

    def _fetch_from_peers(self, engine: CacheEngine, tokens: Any, req_id: str) -> None:
        """With ``enable_p2p``: bring in what a peer holds beyond the local prefix, so the hold
        that follows counts it (bounded by ``p2p_fetch_timeout``; a failure is a miss)."""
        if engine.peer_fetch is None:
            return
        try:
            result = engine.fetch_from_peers(tokens)
        except Exception:  # a fetch is an optimisation: never fail the lookup for it
            log.exception("lmcache connector: request %s: fetching from peers failed; computing", req_id)
            return
        if result is None:
            return
        self.p2p_fetched_tokens += result.tokens
        self.p2p_fetched_bytes += result.bytes
        log.info(
            "lmcache connector: request %s: fetched %d tokens (%d bytes) from peer %s in %.3f s%s",
            req_id, result.tokens, result.bytes, result.peer, result.seconds,
            f" (stopped: {result.error}; the rest is computed)" if result.error else "",
        )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Remember vLLM's paged KV tensors (one per attention layer) and their layout."""
        self._kv = paged_kv_for(kv_caches, self._vllm_config, self._kv_cache_config)
        self._stager = DeviceStager(self._kv.device)
        fmt = self._kv.format
        log.info(
            "lmcache connector: %d layers on %s, %d heads x %d x %d per token, %s; chunks "
            "[layers, tokens, %d]",
            fmt.num_layers, self._kv.device, fmt.heads, fmt.planes, fmt.width, fmt.dtype,
            fmt.token_elements,
        )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Let go of unused holds, then copy this step's hits into their blocks."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LMCacheConnectorMetadata)
        if self._holds is not None:
            for req_id in metadata.releases:
                self._holds.release(req_id)
        for spec in metadata.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        engine, kv, holds = self._engine, self._kv, self._holds
        loaded_to = spec.start  # tokens [start, loaded_to) are in their blocks
        held: PrefixHold | None = None
        sources: collections.Counter[str] = collections.Counter()
        try:
            if engine is not None and kv is not None and holds is not None:
                held = holds.take(spec.req_id)
                if held is None:  # the hold expired (or another rank's lookup made it): take now
                    held = engine.hold(spec.token_ids)
                for (span, view), location in zip(held.chunks, held.locations):
                    begin, stop = max(span.start, loaded_to), min(span.end, spec.end)
                    if span.start > loaded_to or stop <= begin:
                        continue
                    part = view.tensor.narrow(TOKEN_DIM, begin - span.start, stop - begin)
                    kv.scatter(part, kv.slots(spec.block_ids, begin, stop))
                    loaded_to = stop
                    sources[location] += 1
        except Exception as exc:  # any failure: recompute, never crash the worker
            log.warning("lmcache load for request %s failed: %s", spec.req_id, exc)
        finally:
            if held is not None:
                if self._stager is not None:
                    self._stager.finish_loads()  # copies have read the held memory: let it go
                held.release()
        bs = self._block_size
        if loaded_to < spec.end:
            bad = spec.block_ids[loaded_to // bs : -(-spec.end // bs)]
            self._invalid_blocks.update(bad)
            # its blocks past loaded_to hold no valid KV this step: never store them
            self._failed_loads.add(spec.req_id)
            log.warning(
                "lmcache: request %s loaded %d of %d tokens; vLLM recomputes %d block(s)",
                spec.req_id, loaded_to - spec.start, spec.end - spec.start, len(bad),
            )
        else:
            log.info(
                "lmcache: request %s loaded %d tokens (%d..%d); chunks per location: %s",
                spec.req_id, spec.end - spec.start, spec.start, spec.end, dict(sources),
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in ``start_load_kv``; nothing to wait for."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: "AttentionMetadata",
        **kwargs: Any,
    ) -> None:
        """Nothing per layer: every layer is gathered at once in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        """Queue copies of the prompts whose prefill completed this step; stores run behind."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LMCacheConnectorMetadata)
        engine, kv, stager, storer = self._engine, self._kv, self._stager, self._storer
        if engine is None or kv is None or stager is None or storer is None:
            return
        failed, self._failed_loads = self._failed_loads, set()
        for spec in metadata.saves:
            if spec.req_id in failed:
                continue
            try:
                chunks = [
                    (span, kv.gather(kv.slots(spec.block_ids, span.start, span.end)))
                    for span in engine.missing_spans(spec.token_ids)
                ]
                if not chunks:
                    continue
                host, ready = stager.to_host(chunks)
            except (RuntimeError, ValueError, IndexError) as exc:
                # a failed save is a future miss, never a failed request
                log.warning("lmcache save for request %s failed: %s", spec.req_id, exc)
                continue
            storer.submit(SaveJob(spec.req_id, host, ready))

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes them)."""
        bad, self._invalid_blocks = self._invalid_blocks, set()
        return bad

    def flush_saves(self, timeout: float | None = None) -> bool:
        """Wait until every queued save is stored (tests, benchmarks, shutdown)."""
        storer = self._storer
        return True if storer is None else storer.wait_idle(timeout)

    def shutdown(self) -> None:
        """Stop serving lookups, store queued saves, release holds, close the engine."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        storer, self._storer = self._storer, None
        holds, self._holds = self._holds, None
        if storer is not None:
            storer.close()
        if holds is not None:
            holds.close()
        if storer is not None and holds is not None:
            log.info(
                "lmcache connector: stored %d tokens; %d saves dropped (queue full), %d failed; "
                "%d holds expired before their load",
                storer.stored_tokens, storer.dropped_jobs, storer.failed_jobs, holds.expired,
            )
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        for client in self._clients:
            client.close()

    # ==============================================================================
    # Scheduler side
    # ==============================================================================
    def _lookup_all_ranks(self, req_id: str, tokens: list[int]) -> int:
        """Every rank must hold a prefix for it to count; any error is a miss.

        Each rank holds what it found for ``req_id`` until the load or a release.
        """
        found = len(tokens)
        for client in self._clients:
            try:
                found = min(found, client.lookup(tokens, req_id))
            except LookupChannelError as exc:
                log.warning("lmcache lookup failed, treating it as a miss: %s", exc)
                return 0
            if found == 0:
                break
        return found

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Cached tokens beyond ``num_computed_tokens``, loaded synchronously."""
        assert self._planner is not None
        if not self._loads_enabled:
            return 0, False
        prompt = request.prompt_token_ids
        return (
            self._planner.num_new_matched_tokens(request.request_id, prompt, num_computed_tokens),
            False,
        )

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        """Record the load vLLM accepted, with the blocks it allocated for it."""
        assert self._planner is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._planner.after_alloc(
            request.request_id, request.prompt_token_ids, block_ids, num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """This step's loads and saves for the workers."""
        assert self._planner is not None
        scheduled = scheduler_output.num_scheduled_tokens
        new = [
            NewRequest(
                req.req_id,
                req.prompt_token_ids,
                req.block_ids[0] if req.block_ids else [],
                req.num_computed_tokens,
                scheduled.get(req.req_id, 0),
            )
            for req in scheduler_output.scheduled_new_reqs
        ]
        cached_reqs = scheduler_output.scheduled_cached_reqs
        cached = [
            CachedRequest(
                req_id,
                cached_reqs.new_block_ids[i][0] if cached_reqs.new_block_ids[i] else None,
                req_id in cached_reqs.resumed_req_ids,
                cached_reqs.num_computed_tokens[i],
                scheduled.get(req_id, 0),
            )
            for i, req_id in enumerate(cached_reqs.req_ids)
        ]
        plan = self._planner.plan(new, cached)
        return LMCacheConnectorMetadata(loads=plan.loads, saves=plan.saves, releases=plan.releases)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Saves were copied out when the prefill completed, so blocks can be freed now."""
        if self._planner is not None:
            self._planner.finished(request.request_id)
        return False, None
