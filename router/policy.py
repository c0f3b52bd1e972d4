"""Routing policies: pick the prefill and decode workers for one request.

A policy reads a `WorkerStateTracker` (load reports, the KV index, the router's
own pending/committed promises) and returns a `RouteDecision`, or None when no
decode-capable worker can hold the request now (the caller queues it, see
`router.admission`). Policies do not mutate the tracker: after acting on a
decision the caller records it with `tracker.on_routed(request, decision)` and,
when the request ends, `tracker.release(req_id)`.

Pools: workers of role "prefill" prefill, "decode" decode, "both" do either. In
a deployment of only "both" workers one worker is chosen and returned as the
decode worker with `prefill_worker_id=None`. `prefill_worker_id=None` always
means "prefill on the decode worker itself" (no KV transfer).

Every policy honours decode headroom: a decode worker is a candidate only if its
available blocks (see `WorkerStateTracker.available_blocks`) hold the prompt
plus `max_tokens` of output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_state import WorkerStateTracker


@dataclass
class PolicyConfig:
    """Weights and thresholds. Token counts are prompt tokens; fractions are 0..1.

    prefill_queue_weight: prefill cost = uncached prompt tokens + this * (queued +
        pending prefill tokens). 1.0 makes the cost proportional to the request's
        own prefill time plus its wait, so a cache hit of N tokens is worth at most
        N / weight queued tokens of imbalance: that alone rules out a sink.
    balance_abs_threshold_tokens, balance_rel_threshold: if the most loaded prefill
        worker's queue exceeds the least loaded one's by more than abs tokens AND
        by more than rel times, ignore the cache and pick the shortest queue
        (SGLang's balance_abs_threshold/balance_rel_threshold).
    local_prefill_threshold_tokens, local_prefill_penalty_tokens: conditional
        disaggregation. If the chosen decode worker would have to compute at most
        threshold uncached prompt tokens, and that plus the penalty costs no more
        than the best remote prefill (its cost as above), prefill on the decode
        worker and skip the KV transfer. The penalty stands for the wait a local
        prefill adds: it starts with the decode worker's next step (~12 ms on
        Llama-3-8B/H200, i.e. ~400 tokens at 30 us/token). So short remainders
        go local when the prefill pool is queued, remote when it is idle.
        Threshold 0 turns it off.
    decode_memory_weight, decode_load_weight: decode score = memory weight * the
        worker's block use after admitting the request (fraction of total) + load
        weight * its running+waiting+pending requests (fraction of the busiest
        candidate's). Lowest score wins.
    decode_prefix_weight: cache_aware only; subtracts this * (fraction of the
        prompt cached on the decode worker) from its score, so a full hit buys at
        most this much score (e.g. 0.25 = 25% of memory use) of imbalance.
    host_hit_weight: a block in a worker's host tier (continuing its GPU hits) saves
        this share of computing it: the copy back costs the rest (a 16-token block of
        Llama-3-8B is 2 MiB, ~0.1 ms over PCIe against ~0.4 ms of prefill).
    """

    prefill_queue_weight: float = 1.0
    balance_abs_threshold_tokens: int = 4096
    balance_rel_threshold: float = 2.0
    local_prefill_threshold_tokens: int = 256
    local_prefill_penalty_tokens: int = 400
    decode_memory_weight: float = 1.0
    decode_load_weight: float = 1.0
    decode_prefix_weight: float = 0.25
    host_hit_weight: float = 0.8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"PolicyConfig.{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclass
class _Pools:
    prefill: list[str]  # workers that may prefill for a remote decode worker
    decode: list[str]  # decode-capable workers with room for the request
    spare: dict[str, int]  # decode worker -> blocks left after admitting the request
    colocated: bool  # only "both" workers: pick one, prefill_worker_id=None


def _cached_tokens(num_matched_blocks: int, request: RouteRequest, block_size: int) -> int:
    # At least one prompt token is always computed (the model needs its logits).
    max_blocks = (request.num_prompt_tokens - 1) // block_size
    return min(num_matched_blocks, max_blocks) * block_size


class Policy:
    name = "base"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self._num_routed = 0  # rotates where ties are broken, so idle workers share work

    @staticmethod
    def _rotated(workers: list[str], start: int) -> list[str]:
        """`workers` from position `start` (mod len), wrapping: with a start that
        advances per request, `min` over it breaks ties round-robin instead of
        always picking the first worker."""
        if len(workers) < 2:
            return workers
        start %= len(workers)
        return workers[start:] + workers[:start]

    def route(self, request: RouteRequest, state: WorkerStateTracker) -> RouteDecision | None:
        raise NotImplementedError

    @staticmethod
    def _linked(prefill: list[str], decode_worker_id: str, state: WorkerStateTracker) -> list[str]:
        """The prefill workers that can still ship KV to `decode_worker_id`: a pair whose KV
        transfer broke (nccl) is never picked again; with none left the decode worker prefills."""
        if not state.broken_pairs:
            return prefill
        return [w for w in prefill if (w, decode_worker_id) not in state.broken_pairs]

    # ---- shared helpers -----------------------------------------------------------

    def _pools(self, request: RouteRequest, state: WorkerStateTracker) -> _Pools | None:
        prefill_only, decode_only = state.workers("prefill"), state.workers("decode")
        both = state.workers("both")
        self._num_routed += 1
        spare = {}
        for worker_id in self._rotated(decode_only + both, self._num_routed):
            spare_blocks = state.spare_blocks(worker_id, request)
            if spare_blocks >= 0:
                spare[worker_id] = spare_blocks
        if not spare:
            return None
        colocated = not prefill_only and not decode_only
        prefill = self._rotated(prefill_only + both, self._num_routed)
        return _Pools(prefill=prefill, decode=list(spare), spare=spare, colocated=colocated)

    def _decode_scores(
        self,
        request: RouteRequest,
        state: WorkerStateTracker,
        pools: _Pools,
        matched_blocks: dict[str, int],
        prefix_weight: float,
    ) -> dict[str, float]:
        cfg = self.config
        loads = state.loads
        load = {}
        for w in pools.decode:
            report = loads[w]
            load[w] = report.num_running + report.num_waiting + state.num_pending_requests(w)
        load_scale = cfg.decode_load_weight / (max(load.values()) + 1)
        memory_weight = cfg.decode_memory_weight
        prefix_scale = prefix_weight / max(1, len(request.block_hashes))
        scores = {}
        for w, spare_blocks in pools.spare.items():
            used_after = 1.0 - spare_blocks / max(1, loads[w].num_total_blocks)
            scores[w] = memory_weight * used_after + load_scale * load[w]
            if prefix_weight and w in matched_blocks:
                scores[w] -= prefix_scale * matched_blocks[w]
        return scores

    def _hit_tokens(
        self,
        worker_id: str,
        request: RouteRequest,
        state: WorkerStateTracker,
        matched: dict,
        host_weight: float | None = None,
    ) -> float:
        """Prompt tokens `worker_id` need not compute: GPU hits, and host-tier hits that
        continue them, counted at `host_weight` (default: the config's host_hit_weight,
        what their copy back saves)."""
        num_gpu = matched.get(worker_id, 0)
        block_size = state.loads[worker_id].block_size
        num_host = state.host_hit_blocks(worker_id, request.block_hashes, num_gpu)
        gpu_tokens = _cached_tokens(num_gpu, request, block_size)
        if not num_host:
            return gpu_tokens
        weight = self.config.host_hit_weight if host_weight is None else host_weight
        return gpu_tokens + weight * (_cached_tokens(num_gpu + num_host, request, block_size) - gpu_tokens)

    def _decision(
        self,
        request: RouteRequest,
        state: WorkerStateTracker,
        prefill_worker_id: str | None,
        decode_worker_id: str,
        matched: dict[str, int],
    ) -> RouteDecision:
        if prefill_worker_id == decode_worker_id:
            prefill_worker_id = None
        prefilling = prefill_worker_id if prefill_worker_id is not None else decode_worker_id
        # what the prefilling worker will not compute (host hits too: they are copied)
        num_hit_tokens = int(self._hit_tokens(prefilling, request, state, matched, host_weight=1.0))
        return RouteDecision(prefill_worker_id, decode_worker_id, num_hit_tokens)


class RoundRobinPolicy(Policy):
    """Rotate over prefill workers and over decode workers that have room."""

    name = "round_robin"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._next_prefill = 0
        self._next_decode = 0

    def _rotate(self, workers: list[str], feasible: list[str], counter: int) -> tuple[str, int]:
        # Rotate over the full, stable list so skipping a full worker does not
        # shift everyone else's turn; take the first worker with room from the turn.
        feasible_set = set(feasible)
        for step in range(len(workers)):
            worker_id = workers[(counter + step) % len(workers)]
            if worker_id in feasible_set:
                return worker_id, counter + step + 1
        raise AssertionError("no feasible worker")  # callers pass feasible non-empty

    def route(self, request: RouteRequest, state: WorkerStateTracker) -> RouteDecision | None:
        pools = self._pools(request, state)
        if pools is None:
            return None
        decode_capable = state.workers("decode") + state.workers("both")
        decode_worker_id, self._next_decode = self._rotate(decode_capable, pools.decode, self._next_decode)
        prefill_worker_id = None
        prefill_workers = self._linked(
            state.workers("prefill") + state.workers("both"), decode_worker_id, state
        )
        if prefill_workers and not pools.colocated:  # in a stable order
            prefill_worker_id = prefill_workers[self._next_prefill % len(prefill_workers)]
            self._next_prefill += 1
        matched = state.index.overlaps(request.block_hashes)
        return self._decision(request, state, prefill_worker_id, decode_worker_id, matched)


class LeastLoadedPolicy(Policy):
    """Prefill: fewest queued prefill tokens. Decode: lowest memory+load score."""

    name = "least_loaded"

    def route(self, request: RouteRequest, state: WorkerStateTracker) -> RouteDecision | None:
        pools = self._pools(request, state)
        if pools is None:
            return None
        scores = self._decode_scores(request, state, pools, {}, prefix_weight=0.0)
        decode_worker_id = min(pools.decode, key=scores.__getitem__)
        prefill_worker_id = None
        prefill_pool = self._linked(pools.prefill, decode_worker_id, state)
        if prefill_pool and not pools.colocated:
            prefill_worker_id = min(prefill_pool, key=state.queued_prefill_tokens)
        matched = state.index.overlaps(request.block_hashes)
        return self._decision(request, state, prefill_worker_id, decode_worker_id, matched)


class CacheAwarePolicy(Policy):
    """Prefill where the prompt's prefix is cached, weighed against queue length;
    decode where memory and load allow, with a bounded preference for cached
    prefixes; prefill locally on the decode worker when little is left to compute."""

    name = "cache_aware"

    def _best_prefill(
        self, request: RouteRequest, state: WorkerStateTracker, candidates: list[str], matched: dict[str, int]
    ) -> tuple[str, float]:
        """The prefill worker of least cost, and that cost (in prompt tokens)."""
        cfg = self.config
        queued = {w: state.queued_prefill_tokens(w) for w in candidates}
        least_queued = min(candidates, key=queued.__getitem__)
        max_queue, min_queue = max(queued.values()), queued[least_queued]
        if (
            max_queue - min_queue > cfg.balance_abs_threshold_tokens
            and max_queue > cfg.balance_rel_threshold * min_queue
        ):
            # Imbalanced: cache hits may not deepen it.
            hit = self._hit_tokens(least_queued, request, state, matched)
            return least_queued, request.num_prompt_tokens - hit + cfg.prefill_queue_weight * min_queue
        # Workers without a hit all cost the full prompt, so among them only the
        # least queued can win: score it and the workers with a hit.
        best = least_queued
        best_cost = float(request.num_prompt_tokens) + cfg.prefill_queue_weight * min_queue
        for w in candidates:  # rotated order: equal costs are shared round-robin
            if w in matched:
                cost = (
                    request.num_prompt_tokens
                    - self._hit_tokens(w, request, state, matched)
                    + cfg.prefill_queue_weight * queued[w]
                )
                if cost < best_cost:
                    best, best_cost = w, cost
        return best, best_cost

    def route(self, request: RouteRequest, state: WorkerStateTracker) -> RouteDecision | None:
        pools = self._pools(request, state)
        if pools is None:
            return None
        matched = state.index.overlaps(request.block_hashes)
        if pools.colocated:
            worker_id, _ = self._best_prefill(request, state, pools.decode, matched)
            return self._decision(request, state, None, worker_id, matched)
        scores = self._decode_scores(request, state, pools, matched, self.config.decode_prefix_weight)
        decode_worker_id = min(pools.decode, key=scores.__getitem__)
        decode_hit_tokens = self._hit_tokens(decode_worker_id, request, state, matched)
        uncached_on_decode = request.num_prompt_tokens - decode_hit_tokens
        prefill_pool = self._linked(pools.prefill, decode_worker_id, state)
        if not prefill_pool:
            return self._decision(request, state, None, decode_worker_id, matched)
        prefill_worker_id, remote_cost = self._best_prefill(request, state, prefill_pool, matched)
        cfg = self.config
        if (
            uncached_on_decode <= cfg.local_prefill_threshold_tokens
            and uncached_on_decode + cfg.local_prefill_penalty_tokens <= remote_cost
        ):
            return self._decision(request, state, None, decode_worker_id, matched)
        return self._decision(request, state, prefill_worker_id, decode_worker_id, matched)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobinPolicy, LeastLoadedPolicy, CacheAwarePolicy)
}
DEFAULT_POLICY = CacheAwarePolicy.name


def make_policy(name: str = DEFAULT_POLICY, **params: float) -> Policy:
    """Build a policy by name; `params` are `PolicyConfig` fields."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for routing policy {name!r}; known: {sorted(known)}")
    return POLICIES[name](PolicyConfig(**params))
