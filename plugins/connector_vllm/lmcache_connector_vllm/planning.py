"""The scheduler side's bookkeeping: which blocks to load and which to store, per step.

Pure Python and independent of vLLM's classes, so its rules are tested directly:

* only whole blocks are ever loaded, and never the prompt's last token (vLLM must compute at
  least one token to sample from), so a hit is capped at ``(len(prompt) - 1)`` rounded down to
  a block boundary;
* blocks vLLM already has (its own prefix cache) are not loaded again;
* a prompt is stored once, in the step its prefill completes, as its whole blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of the prompt into the request's blocks."""

    req_id: str
    token_ids: list[int]  # the prompt prefix to retrieve by: reaches ``end``, maybe beyond
    block_ids: list[int]  # the request's blocks, from its first token
    start: int  # block-aligned; tokens before it are in vLLM's own prefix cache
    end: int  # block-aligned


@dataclass
class SaveSpec:
    """Store ``token_ids`` (whole blocks) from the first ``len(token_ids) / block_size`` blocks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class NewRequest:
    """What the scheduler tells about a request scheduled for the first time (or resumed)."""

    req_id: str
    prompt: Sequence[int] | None
    block_ids: Sequence[int]
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass
class CachedRequest:
    """What the scheduler tells about a request scheduled again."""

    req_id: str
    new_block_ids: Sequence[int] | None
    resumed: bool  # True: ``new_block_ids`` replaces the request's blocks
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass
class _Tracked:
    prompt: list[int]
    block_ids: list[int]
    saved: bool = False


class LoadPlanner:
    """Turns lookups and the scheduler's decisions into per-step load and save lists."""

    def __init__(
        self,
        block_size: int,
        chunk_size: int,
        lookup: Callable[[list[int]], int],
        *,
        save: bool = True,
    ) -> None:
        self.block_size = block_size
        self.chunk_size = chunk_size
        self._lookup = lookup
        self._save = save
        # req_id -> (tokens vLLM has itself, prompt length to retrieve by), at the last query
        self._local: dict[str, tuple[int, int]] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._tracked: dict[str, _Tracked] = {}

    def loadable_limit(self, num_prompt_tokens: int) -> int:
        """The most tokens a load may cover: all whole blocks before the prompt's last token."""
        return max(num_prompt_tokens - 1, 0) // self.block_size * self.block_size

    def num_new_matched_tokens(
        self, req_id: str, prompt: Sequence[int] | None, num_computed_tokens: int
    ) -> int:
        """Tokens beyond ``num_computed_tokens`` that can be loaded (whole blocks; 0 on a miss)."""
        if not prompt:
            return 0
        limit = self.loadable_limit(len(prompt))
        if limit <= num_computed_tokens:
            return 0
        # Chunk hashes depend on where a sequence ends, so ask twice: by the whole prompt (its
        # stored chunks may run past the last loadable token: load only their head), and by
        # the prompt cut at the limit (what a store of this same prompt leaves as its tail).
        tokens = list(prompt)
        whole = min(self._lookup(tokens), limit) // self.block_size * self.block_size
        retrieve_len = min(len(tokens), -(-whole // self.chunk_size) * self.chunk_size)
        if whole < limit:
            cut = min(self._lookup(tokens[:limit]), limit) // self.block_size * self.block_size
            if cut > whole:
                whole, retrieve_len = cut, limit
        self._local[req_id] = (num_computed_tokens, retrieve_len)
        return max(whole - num_computed_tokens, 0)

    def after_alloc(
        self,
        req_id: str,
        prompt: Sequence[int] | None,
        block_ids: Sequence[int],
        num_external_tokens: int,
    ) -> None:
        """Record the load the scheduler accepted (``num_external_tokens`` > 0)."""
        local, retrieve_len = self._local.pop(req_id, (0, 0))
        if num_external_tokens <= 0 or not prompt:
            self._pending_loads.pop(req_id, None)
            return
        end = local + num_external_tokens
        self._pending_loads[req_id] = LoadSpec(
            req_id, list(prompt[: max(retrieve_len, end)]), list(block_ids), start=local, end=end
        )

    def plan(
        self, new: Sequence[NewRequest], cached: Sequence[CachedRequest]
    ) -> StepPlan:
        """This step's loads (accepted since the last step) and saves (prefills that complete)."""
        plan = StepPlan()
        for req in new:
            if req.prompt is None:
                continue
            tracked = self._tracked.get(req.req_id)
            if tracked is None:
                tracked = self._tracked[req.req_id] = _Tracked(list(req.prompt), [])
            tracked.block_ids = list(req.block_ids)
            self._add_load(plan, req.req_id, tracked.block_ids)
            self._maybe_save(plan, req.req_id, tracked, req.num_computed_tokens + req.num_scheduled_tokens)
        for req in cached:
            tracked = self._tracked.get(req.req_id)
            if tracked is None:
                continue
            if req.new_block_ids is not None:
                if req.resumed:
                    tracked.block_ids = list(req.new_block_ids)
                else:
                    tracked.block_ids.extend(req.new_block_ids)
            if req.resumed:
                self._add_load(plan, req.req_id, tracked.block_ids)
            self._maybe_save(plan, req.req_id, tracked, req.num_computed_tokens + req.num_scheduled_tokens)
        # a load accepted for a request that was not scheduled after all must not linger
        self._pending_loads.clear()
        return plan

    def _add_load(self, plan: StepPlan, req_id: str, block_ids: list[int]) -> None:
        spec = self._pending_loads.pop(req_id, None)
        if spec is not None:
            spec.block_ids = list(block_ids)
            plan.loads.append(spec)

    def _maybe_save(self, plan: StepPlan, req_id: str, tracked: _Tracked, computed: int) -> None:
        if not self._save or tracked.saved or computed < len(tracked.prompt):
            return
        tracked.saved = True  # once per request, even if it is preempted and resumed
        num_tokens = len(tracked.prompt) // self.block_size * self.block_size
        if num_tokens == 0:
            return
        num_blocks = num_tokens // self.block_size
        if len(tracked.block_ids) < num_blocks:  # defensive: never save blocks we do not know
            return
        plan.saves.append(
            SaveSpec(req_id, tracked.prompt[:num_tokens], tracked.block_ids[:num_blocks])
        )

    def finished(self, req_id: str) -> None:
        """Forget a finished request."""
        self._tracked.pop(req_id, None)
        self._pending_loads.pop(req_id, None)
        self._local.pop(req_id, None)
