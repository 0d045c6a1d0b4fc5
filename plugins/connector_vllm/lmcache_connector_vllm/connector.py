"""``LMCacheConnectorV1``: vLLM's v1 KV connector backed by lmcache-core's ``CacheEngine``.

Load it either way::

    --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1",
        "kv_connector_module_path":"lmcache_connector_vllm.connector","kv_role":"kv_both"}'
    --kv-transfer-config '{"kv_connector":"LMCacheCoreConnectorV1","kv_role":"kv_both"}'

The second name is registered by this distribution's ``vllm.general_plugins`` entry point.

vLLM builds one connector per role. The WORKER one (in each worker process) owns the
``CacheEngine``: it copies whole KV blocks into the engine when a prompt's prefill completes and
out of it before the forward pass that needs them. The SCHEDULER one owns no data; it asks the
worker how many tokens are cached through a ``LookupClient`` and plans loads and saves.

Loads are synchronous (they finish in ``start_load_kv``, before the forward pass). A load that
fails (a chunk evicted or cleared since the lookup, a corrupt file, a chunk of another layout)
reports its blocks through ``get_block_ids_with_load_errors`` and vLLM recomputes them when
``kv_load_failure_policy`` is ``"recompute"`` (with vLLM's default ``"fail"`` the request ends
with an error instead); loaded KV is never wrong, because a block is only ever copied whole
from a chunk with the same prefix hash, model, rank, dtype, block size and shape.
"""

from __future__ import annotations

import atexit
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
from lmcache_core.engine import CacheEngine, EngineMetadata
from lmcache_core.errors import ConfigError, LMCacheError
from lmcache_core.keys import ChunkSpan
from lmcache_core.plugins import get_plugin_manager

from lmcache_connector_vllm.lookup_channel import (
    LookupChannelError,
    LookupClient,
    LookupServer,
    channel_path,
)
from lmcache_connector_vllm.paged_kv import TOKEN_DIM, PagedKVLayout
from lmcache_connector_vllm.planning import (
    CachedRequest,
    LoadPlanner,
    LoadSpec,
    NewRequest,
    SaveSpec,
)

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


def engine_metadata(vllm_config: "VllmConfig", rank: int) -> EngineMetadata:
    """Chunk-key fields from vLLM's config.

    ``kv_dtype`` also names the block size: blocks of different sizes lay KV out differently,
    so they must never share keys.
    """
    model_config = vllm_config.model_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else str(cache_dtype)
    parallel = vllm_config.parallel_config
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    return EngineMetadata(
        model_name=str(model_config.model),
        world_size=world_size,
        worker_id=rank,
        kv_dtype=f"{dtype}.blk{vllm_config.cache_config.block_size}",
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
    """One disk directory per rank: a LocalDiskBackend owns its directory exclusively."""
    disk = settings.local_disk_path
    if world_size == 1 or disk is None:
        return settings
    return settings.model_copy(update={"local_disk": str(disk / f"rank{rank}")})


def _load_settings() -> LMCacheSettings:
    # plugins' settings keys are only valid with the plugin manager that contributed them
    return load_settings(get_plugin_manager())


class LMCacheConnectorV1(KVConnectorBase_V1):
    """vLLM v1 KV connector storing prompt KV in lmcache-core's tiered cache.

    Configuration comes from ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*`` variables; the chunk
    size must be a multiple of vLLM's block size.
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
        if self._settings.chunk_size % self._block_size != 0:
            raise ConfigError(
                f"chunk_size {self._settings.chunk_size} must be a multiple of vLLM's block size "
                f"{self._block_size} (set chunk_size or --block-size)"
            )
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
        self._layout: PagedKVLayout | None = None
        self._invalid_blocks: set[int] = set()
        self._failed_loads: set[str] = set()  # requests whose load failed in this step
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
                self._server = LookupServer(self._channels[rank], self._engine_lookup)
            except BaseException:
                self._engine.close()
                raise
            # vLLM calls shutdown() on a clean exit; this also covers an interpreter exit
            atexit.register(self.shutdown)
            log.info(
                "lmcache connector worker %d: locations %s, chunk_size %d, lookups on %s",
                rank, self._engine.locations, self._engine.chunk_size, self._channels[rank],
            )
        else:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.warning(
                    "lmcache connector: kv_load_failure_policy is %r, so a chunk that fails to "
                    "load (evicted or cleared after its lookup, corrupt on disk) fails its "
                    "request; set \"kv_load_failure_policy\":\"recompute\" in "
                    "--kv-transfer-config to recompute it instead",
                    self._kv_transfer_config.kv_load_failure_policy,
                )
            self._clients = [LookupClient(p, self._lookup_timeout) for p in self._channels]
            # kv_role: a producer only stores, a consumer only loads, kv_both does both
            self._loads_enabled = bool(self._kv_transfer_config.is_kv_consumer)
            self._planner = LoadPlanner(
                self._block_size,
                self._settings.chunk_size,
                self._lookup_all_ranks,
                save=bool(self._kv_transfer_config.is_kv_producer),
            )

    # ==============================================================================
    # Worker side
    # ==============================================================================
    def _engine_lookup(self, tokens: Any) -> int:
        engine = self._engine
        return engine.lookup(tokens) if engine is not None else 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Remember vLLM's paged KV tensors (one per attention layer)."""
        num_blocks = int(self._kv_cache_config.num_blocks)
        self._layout = PagedKVLayout.from_kv_caches(kv_caches, self._block_size, num_blocks)
        log.info(
            "lmcache connector: %d layers, block %d tokens x %d elements per row, %s",
            self._layout.num_layers, self._block_size, self._layout.row, self._layout.dtype,
        )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Copy this step's hits into their blocks before the forward pass (synchronously)."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LMCacheConnectorMetadata)
        for spec in metadata.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        engine, layout, bs = self._engine, self._layout, self._block_size
        loaded_to = spec.start  # tokens [start, loaded_to) are in their blocks
        hits_before = self._location_hits()

        def sink(span: ChunkSpan, tensor: torch.Tensor) -> None:
            nonlocal loaded_to
            # skip blocks vLLM already has, and a chunk's tail past the last loadable token
            begin, stop = max(span.start, spec.start), min(span.end, spec.end)
            if stop <= begin:
                return
            part = tensor.narrow(TOKEN_DIM, begin - span.start, stop - begin)
            assert layout is not None
            layout.scatter(part, spec.block_ids[begin // bs : stop // bs])
            loaded_to = stop

        if engine is not None and layout is not None:
            try:
                engine.retrieve(spec.token_ids, sink)
            except Exception as exc:  # any failure: recompute, never crash the worker
                log.warning("lmcache load for request %s failed: %s", spec.req_id, exc)
        sources = self._hits_since(hits_before)
        if loaded_to < spec.end:
            bad = spec.block_ids[loaded_to // bs : spec.end // bs]
            self._invalid_blocks.update(bad)
            # its blocks past loaded_to hold no valid KV this step: never store them
            self._failed_loads.add(spec.req_id)
            log.warning(
                "lmcache: request %s loaded %d of %d tokens; vLLM recomputes %d block(s)",
                spec.req_id, loaded_to - spec.start, spec.end - spec.start, len(bad),
            )
        else:
            log.info(
                "lmcache: request %s loaded %d tokens (%d..%d); chunk hits per location: %s",
                spec.req_id, spec.end - spec.start, spec.start, spec.end, sources,
            )

    def _location_hits(self) -> dict[str, int]:
        engine = self._engine
        if engine is None:
            return {}
        return {loc: int(st.get("hits", 0)) for loc, st in engine.stats().items()}

    def _hits_since(self, before: dict[str, int]) -> dict[str, int]:
        """Chunk hits per location since ``before`` (for the log: which tier served a load)."""
        now = self._location_hits()
        return {loc: n - before.get(loc, 0) for loc, n in now.items() if n - before.get(loc, 0)}

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in ``start_load_kv``; nothing to wait for."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: "AttentionMetadata",
        **kwargs: Any,
    ) -> None:
        """Nothing per layer: whole blocks of every layer are stored in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        """Store the prompts whose prefill completed this step (copies out of vLLM's blocks)."""
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LMCacheConnectorMetadata)
        engine, layout, bs = self._engine, self._layout, self._block_size
        if engine is None or layout is None:
            return
        failed, self._failed_loads = self._failed_loads, set()
        for spec in metadata.saves:
            if spec.req_id in failed:
                continue
            blocks = spec.block_ids

            def chunk(start: int, end: int, blocks: list[int] = blocks) -> torch.Tensor:
                return layout.gather(blocks[start // bs : end // bs])

            try:
                stored = engine.store(spec.token_ids, chunk_fn=chunk, token_dim=TOKEN_DIM)
            except (LMCacheError, RuntimeError, ValueError) as exc:
                # a failed save is a future miss, never a failed request
                log.warning("lmcache store for request %s failed: %s", spec.req_id, exc)
                continue
            log.debug(
                "lmcache: request %s stored %d new of %d tokens",
                spec.req_id, stored, len(spec.token_ids),
            )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes them)."""
        bad, self._invalid_blocks = self._invalid_blocks, set()
        return bad

    def shutdown(self) -> None:
        """Stop serving lookups and close the engine (queued disk writes complete first)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        for client in self._clients:
            client.close()

    # ==============================================================================
    # Scheduler side
    # ==============================================================================
    def _lookup_all_ranks(self, tokens: list[int]) -> int:
        """Every rank must hold a prefix for it to count; any error is a miss."""
        found = len(tokens)
        for client in self._clients:
            try:
                found = min(found, client.lookup(tokens))
            except LookupChannelError as exc:
                log.warning("lmcache lookup failed, treating it as a miss: %s", exc)
                return 0
            if found == 0:
                break
        return found

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Cached whole blocks beyond ``num_computed_tokens``, loaded synchronously."""
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
        return LMCacheConnectorMetadata(loads=plan.loads, saves=plan.saves)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Saves already happened when the prefill completed, so blocks can be freed now."""
        if self._planner is not None:
            self._planner.finished(request.request_id)
        return False, None
