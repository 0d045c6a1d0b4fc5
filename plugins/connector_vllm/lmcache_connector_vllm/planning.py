"""The scheduler side's bookkeeping: which tokens to load and which to store, per step.

Pure Python and independent of vLLM's classes, so its rules are tested directly:

* loads are token-granular: a hit of ``k`` cached tokens loads ``min(k, len(prompt) - 1)``
  tokens (vLLM must compute at least one token to sample from), into partially filled blocks
  too; tokens vLLM already has (its own prefix cache) are not loaded again;
* a lookup made for a request *holds* the chunks it found in the worker (see
  ``CacheEngine.hold``) until the load is done or the request goes away: every hold is either
  consumed by a load or named in ``StepPlan.releases``;
* a prompt is stored once, in the step its prefill completes, every token of it (the last,
  partial chunk included).
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
    start: int  # tokens before it are in vLLM's own prefix cache
    end: int


@dataclass
class SaveSpec:
    """Store ``token_ids`` (the whole prompt) from the request's blocks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: requests whose held chunks the workers let go without loading them
    releases: list[str] = field(default_factory=list)


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


#: ``lookup(req_id, tokens)``: tokens of the longest stored prefix, held for ``req_id``
HoldingLookup = Callable[[str, list[int]], int]


class LoadPlanner:
    """Turns lookups and the scheduler's decisions into per-step loads, saves and releases."""

    def __init__(
        self,
        block_size: int,
        lookup: HoldingLookup,
        *,
        save: bool = True,
    ) -> None:
        self.block_size = block_size
        self._lookup = lookup
        self._save = save
        # req_id -> tokens vLLM has itself, at the last query (a hold exists in the workers)
        self._local: dict[str, int] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._releases: list[str] = []
        self._tracked: dict[str, _Tracked] = {}

    @staticmethod
    def loadable_limit(num_prompt_tokens: int) -> int:
        """The most tokens a load may cover: all but the prompt's last token."""
        return max(num_prompt_tokens - 1, 0)

    def num_new_matched_tokens(
        self, req_id: str, prompt: Sequence[int] | None, num_computed_tokens: int
    ) -> int:
        """Tokens beyond ``num_computed_tokens`` that can be loaded (0 on a miss)."""
        if not prompt:
            return 0
        limit = self.loadable_limit(len(prompt))
        if limit <= num_computed_tokens:
            self._forget_hold(req_id)
            return 0
        # a repeated query replaces the request's hold in the workers
        hit = min(self._lookup(req_id, list(prompt)), limit)
        self._local[req_id] = num_computed_tokens
        return max(hit - num_computed_tokens, 0)

    def after_alloc(
        self,
        req_id: str,
        prompt: Sequence[int] | None,
        block_ids: Sequence[int],
        num_external_tokens: int,
    ) -> None:
        """Record the load the scheduler accepted (``num_external_tokens`` > 0), or drop it."""
        if num_external_tokens <= 0 or not prompt:
            self._pending_loads.pop(req_id, None)
            self._forget_hold(req_id)
            return
        local = self._local.pop(req_id, 0)
        end = local + num_external_tokens
        self._pending_loads[req_id] = LoadSpec(
            req_id, list(prompt), list(block_ids), start=local, end=end
        )

    def plan(
        self, new: Sequence[NewRequest], cached: Sequence[CachedRequest]
    ) -> StepPlan:
        """This step's loads (accepted since the last step), saves (prefills that complete)
        and releases (holds no load will use)."""
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
        for req_id in self._pending_loads:
            self._releases.append(req_id)
        self._pending_loads.clear()
        plan.releases, self._releases = self._releases, []
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
        num_blocks = -(-len(tracked.prompt) // self.block_size)
        if len(tracked.block_ids) < num_blocks:  # defensive: never save blocks we do not know
            return
        plan.saves.append(SaveSpec(req_id, tracked.prompt, tracked.block_ids[:num_blocks]))

    def _forget_hold(self, req_id: str) -> None:
        if self._local.pop(req_id, None) is not None:
            self._releases.append(req_id)

    def finished(self, req_id: str) -> None:
        """Forget a finished request; its hold, if a load never used it, is released."""
        self._tracked.pop(req_id, None)
        if self._pending_loads.pop(req_id, None) is not None:
            self._releases.append(req_id)
        self._forget_hold(req_id)
