"""Discrete-event simulator of a disaggregated cluster, driving the router's real
policies, tracker and KV index (router/), with each simulated worker's KV cache
a real `engine.core.BlockPool` whose BlockStored/BlockRemoved events feed the
router exactly as live workers' do.

Cost model, calibrated roughly to Llama-3-8B (bf16) on one H200 per worker:
  prefill batch time  = 3 ms + 30 us * uncached prompt tokens in the batch
  decode step time    = 12 ms + 0.05 ms * batch size + 0.03 us * context tokens
                        (+ 30 us per token of any prefill run on the decode worker)
  KV transfer time    = 0.5 ms + 128 KiB/token * tokens / --transfer-gbps
Every worker reports load and ships its KV events every --report-interval-ms.
A decode worker reserves prompt blocks when routed; output grows one slot per
step; a step that cannot get a block preempts the newest request (recompute).

    python -m pdserve.bench.policy_sim --num-prefill 16 --num-decode 16 --num-requests 10000 \\
        --workload prefix-sharing --policy all
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from collections import deque
from collections.abc import Callable

from pdserve.bench.policy_workloads import BLOCK_SIZE, SimRequest, make_workload, oracle_hit_tokens
from pdserve.engine.core.block_pool import BlockPool
from pdserve.engine.core.kv_cache_manager import cdiv
from pdserve.engine.core.outputs import LoadReport
from pdserve.router.kv_sync import KVEventBatch
from pdserve.router.policy import POLICIES, make_policy
from pdserve.router.routing import RouteRequest
from pdserve.router.worker_state import WorkerStateTracker

PREFILL_FIXED_S, PREFILL_PER_TOKEN_S = 3e-3, 30e-6
DECODE_FIXED_S, DECODE_PER_SEQ_S, DECODE_PER_CTX_TOKEN_S = 12e-3, 0.05e-3, 0.03e-6
KV_BYTES_PER_TOKEN = 128 * 1024  # 32 layers * 2 (K,V) * 8 KV heads * 128 dims * 2 bytes
TRANSFER_FIXED_S = 0.5e-3
MAX_PREFILL_BATCH_TOKENS = 16384


# ---- workers -------------------------------------------------------------------------


class SimWorker:
    """A prefill or a decode worker: a real BlockPool plus the queues it needs."""

    def __init__(self, worker_id: str, num_blocks: int) -> None:
        self.worker_id = worker_id
        self.pool = BlockPool(num_blocks)
        self.seq = 0  # KV event batch counter
        # prefill side
        self.queue: deque[SimRequest] = deque()
        self.queued_tokens = 0  # router-estimated uncached tokens waiting
        self.batch_tokens = 0  # uncached tokens of the batch being computed
        self.busy = False
        self.busy_time = 0.0
        # decode side
        self.to_reserve: deque[SimRequest] = deque()  # routed here, waiting for blocks
        self.ready: list[SimRequest] = []  # reserved, waiting to join the batch
        self.running: list[SimRequest] = []
        self.stepping = False
        self.tokens_generated = 0


class Simulation:
    def __init__(self, args: argparse.Namespace, policy_name: str, requests: list[SimRequest]) -> None:
        self.args = args
        self.policy = make_policy(policy_name, **args.policy_params)
        self.tracker = WorkerStateTracker(
            use_kv_events=not args.no_kv_events, track_committed_blocks=args.headroom == "committed"
        )
        num_p, num_d = args.num_prefill, args.num_decode
        self.prefill = {f"p{i}": SimWorker(f"p{i}", args.kv_blocks_per_prefill) for i in range(num_p)}
        self.decode = {f"d{i}": SimWorker(f"d{i}", args.kv_blocks_per_decode) for i in range(num_d)}
        self.requests = requests
        self.events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.counter = 0
        self.now = 0.0
        self.waiting: deque[SimRequest] = deque()  # the router's admission queue
        self.rejected = 0
        self.preemptions = 0
        self.routing_caused_preemptions = 0
        self.transfer_s_per_token = KV_BYTES_PER_TOKEN / (args.transfer_gbps * 1e9)

    def push(self, at: float, handler: Callable[..., None], *args: object) -> None:
        self.counter += 1  # tie-breaker: equal times run in push order
        heapq.heappush(self.events, (at, self.counter, handler, args))

    # ---- router side ----
    def report(self) -> None:
        if self.events or self.waiting:  # reschedule while anything is left to do
            self.push(self.now + self.args.report_interval_ms / 1e3, self.report)
        for w in self.prefill.values():
            queued = w.queued_tokens + w.batch_tokens
            self._send_state(w, "prefill", w.pool, 0, len(w.queue), queued)
        for d in self.decode.values():
            local = sum(r.local_prefill_tokens for r in d.ready if r.needs_local_prefill)
            self._send_state(d, "decode", d.pool, len(d.running), len(d.ready) + len(d.to_reserve), local)
        self.admit_waiting()

    def _send_state(self, w, role: str, pool: BlockPool, running: int, waiting: int, queued: int) -> None:
        batch = KVEventBatch(w.worker_id, "i0", w.seq, pool.take_events())
        w.seq += 1
        assert self.tracker.apply(batch)
        self.tracker.update_load(
            LoadReport(
                w.worker_id,
                "i0",
                role,
                pool.num_free_blocks,
                pool.num_blocks,
                BLOCK_SIZE,
                running,
                waiting,
                queued,
                self.now,
            )
        )

    def try_route(self, r: SimRequest) -> bool:
        route_request = RouteRequest(r.req_id, r.num_prompt_tokens, r.block_hashes, r.max_tokens)
        decision = self.policy.route(route_request, self.tracker)
        if decision is None:
            return False
        self.tracker.on_routed(route_request, decision, now=self.now)
        r.decision = decision
        d = self.decode[decision.decode_worker_id]
        if decision.prefill_worker_id is None:
            r.needs_local_prefill = True
        else:
            p = self.prefill[decision.prefill_worker_id]
            p.queue.append(r)
            p.queued_tokens += r.num_prompt_tokens - decision.num_prefix_hit_tokens
            self.start_prefill(p)
        d.to_reserve.append(r)
        self.reserve(d)
        return True

    def arrive(self, r: SimRequest) -> None:
        if not self.waiting and self.try_route(r):
            return
        if len(self.waiting) >= self.args.max_queue_len:
            self.rejected += 1
        else:
            self.waiting.append(r)

    def admit_waiting(self) -> None:
        while self.waiting:
            r = self.waiting[0]
            if self.now - r.arrival > self.args.max_wait_s:
                self.waiting.popleft()
                self.rejected += 1
            elif self.try_route(r):
                self.waiting.popleft()
            else:
                return

    # ---- prefill worker ----
    def start_prefill(self, p: SimWorker) -> None:
        if p.busy or not p.queue:
            return
        batch, tokens = [], 0
        while p.queue and tokens < MAX_PREFILL_BATCH_TOKENS:
            r = p.queue[0]
            hits = p.pool.lookup(r.block_hashes[: (r.num_prompt_tokens - 1) // BLOCK_SIZE])
            p.pool.touch(hits)
            need = cdiv(r.num_prompt_tokens, BLOCK_SIZE) - len(hits)
            if need > p.pool.num_free_blocks:
                p.pool.free(hits)
                break
            p.queue.popleft()
            p.queued_tokens -= r.num_prompt_tokens - r.decision.num_prefix_hit_tokens
            r.prefill_blocks = hits + p.pool.allocate(need)
            r.hit_tokens = len(hits) * BLOCK_SIZE
            tokens += r.num_prompt_tokens - r.hit_tokens
            batch.append(r)
        if not batch:
            return
        p.busy = True
        p.batch_tokens = tokens
        duration = PREFILL_FIXED_S + PREFILL_PER_TOKEN_S * tokens
        p.busy_time += duration
        self.push(self.now + duration, self.prefill_done, p, batch)

    def prefill_done(self, p: SimWorker, batch: list[SimRequest]) -> None:
        p.busy = False
        p.batch_tokens = 0
        for r in batch:
            num_full = len(r.block_hashes)
            p.pool.cache_blocks(r.prefill_blocks[:num_full], r.block_hashes, 0)
            r.first_token = self.now
            r.generated = 1
            # Only the blocks the decode worker lacks travel.
            num_sent_tokens = r.num_prompt_tokens - r.decode_hit_tokens
            send_s = TRANSFER_FIXED_S + self.transfer_s_per_token * num_sent_tokens
            self.push(self.now + send_s, self.kv_arrived, p, r)
        self.start_prefill(p)

    def kv_arrived(self, p: SimWorker, r: SimRequest) -> None:
        p.pool.free(list(reversed(r.prefill_blocks)))
        r.prefill_blocks = []
        r.kv_ready = True
        d = self.decode[r.decision.decode_worker_id]
        if r.blocks:  # reserved already
            d.pool.cache_blocks(r.blocks[: len(r.block_hashes)], r.block_hashes, 0)
            if r.output_len <= 1:
                self.finish(d, r)
            else:
                d.ready.append(r)
                self.start_step(d)

    # ---- decode worker ----
    def reserve(self, d: SimWorker) -> None:
        while d.to_reserve:
            r = d.to_reserve[0]
            num_tokens = r.num_prompt_tokens + max(0, r.generated - 1)
            hits = d.pool.lookup(r.block_hashes[: (num_tokens - 1) // BLOCK_SIZE])
            d.pool.touch(hits)
            need = cdiv(num_tokens, BLOCK_SIZE) - len(hits)
            if need > d.pool.num_free_blocks:
                d.pool.free(hits)
                return
            d.to_reserve.popleft()
            r.blocks = hits + d.pool.allocate(need)
            r.decode_hit_tokens = len(hits) * BLOCK_SIZE
            if r.kv_ready and not r.needs_local_prefill:
                d.pool.cache_blocks(r.blocks[: len(r.block_hashes)], r.block_hashes, 0)
            if r.needs_local_prefill:
                r.local_prefill_tokens = num_tokens - len(hits) * BLOCK_SIZE
                if r.first_token < 0:
                    r.hit_tokens = len(hits) * BLOCK_SIZE
            if r.kv_ready or r.needs_local_prefill:
                d.ready.append(r)
        self.start_step(d)

    def start_step(self, d: SimWorker) -> None:
        if d.stepping or not (d.running or d.ready):
            return
        local_tokens = 0
        for r in d.ready:
            if r.needs_local_prefill:
                local_tokens += r.local_prefill_tokens
        joining, d.ready = d.ready, []
        context = sum(r.num_prompt_tokens + r.generated for r in d.running)
        duration = (
            DECODE_FIXED_S
            + DECODE_PER_SEQ_S * len(d.running)
            + DECODE_PER_CTX_TOKEN_S * context
            + PREFILL_PER_TOKEN_S * local_tokens
        )
        d.stepping = True
        self.push(self.now + duration, self.step_done, d, joining)

    def step_done(self, d: SimWorker, joining: list[SimRequest]) -> None:
        d.stepping = False
        finished = []
        for r in list(d.running):
            if r not in d.running:
                continue  # preempted earlier in this loop
            r.generated += 1
            d.tokens_generated += 1
            if r.generated >= r.output_len:
                finished.append(r)
                d.running.remove(r)
                self.finish(d, r)
            elif cdiv(r.num_prompt_tokens + r.generated, BLOCK_SIZE) > len(r.blocks):
                while d.pool.num_free_blocks == 0:
                    self.preempt(d)
                if r in d.running:
                    r.blocks += d.pool.allocate(1)
        for r in joining:
            # Its first output from this worker: the router's books share its prompt blocks now.
            self.tracker.on_kv_landed(r.req_id)
            if r.needs_local_prefill:  # computed this step: the first token is out
                r.needs_local_prefill = False
                d.pool.cache_blocks(r.blocks[: len(r.block_hashes)], r.block_hashes, 0)
                if r.first_token < 0:
                    r.first_token = self.now
                    r.generated = 1
                if r.generated >= r.output_len:
                    self.finish(d, r)
                    continue
            d.running.append(r)
        if finished:
            self.reserve(d)
            self.admit_waiting()
        self.start_step(d)

    def preempt(self, d: SimWorker) -> None:
        victim = d.running.pop()
        self.preemptions += 1
        if self.tracker.committed_blocks(d.worker_id) > d.pool.num_blocks:
            self.routing_caused_preemptions += 1
        d.pool.free(list(reversed(victim.blocks)))
        victim.blocks = []
        victim.needs_local_prefill = True  # recompute prompt + generated tokens here
        d.to_reserve.appendleft(victim)

    def finish(self, d: SimWorker, r: SimRequest) -> None:
        r.finish = self.now
        d.pool.free(list(reversed(r.blocks)))
        r.blocks = []
        self.tracker.release(r.req_id)

    # ---- main loop ----
    def run(self) -> dict:
        for r in self.requests:
            self.push(r.arrival, self.arrive, r)
        self.push(0.0, self.report)
        while self.events:
            self.now, _, handler, args = heapq.heappop(self.events)
            handler(*args)
        return self.metrics()

    def metrics(self) -> dict:
        served = [r for r in self.requests if r.finish >= 0]
        ttft = {r.req_id: (r.first_token - r.arrival) * 1e3 for r in served}
        tpot = {
            r.req_id: (r.finish - r.first_token) * 1e3 / (r.output_len - 1)
            for r in served
            if r.output_len > 1
        }
        good = sum(
            ttft[r.req_id] <= self.args.ttft_slo_ms and tpot.get(r.req_id, 0.0) <= self.args.tpot_slo_ms
            for r in served
        )
        span = max(r.finish for r in served) - self.requests[0].arrival if served else 1.0
        busy = [w.busy_time for w in self.prefill.values()]
        decode_tokens = [d.tokens_generated for d in self.decode.values()]
        routed_prompt_tokens = sum(r.num_prompt_tokens for r in self.requests if r.decision is not None)
        return {
            "prefix_hit_rate": round(sum(r.hit_tokens for r in served) / max(1, routed_prompt_tokens), 4),
            "oracle_prefix_hit_rate": round(
                oracle_hit_tokens(self.requests) / sum(r.num_prompt_tokens for r in self.requests), 4
            ),
            "ttft_p50_ms": percentile(ttft.values(), 0.5),
            "ttft_p99_ms": percentile(ttft.values(), 0.99),
            "tpot_p50_ms": percentile(tpot.values(), 0.5),
            "tpot_p99_ms": percentile(tpot.values(), 0.99),
            "goodput_rps": round(good / span, 2),
            "throughput_rps": round(len(served) / span, 2),
            "completed": len(served),
            "preemptions": self.preemptions,
            "routing_caused_preemptions": self.routing_caused_preemptions,
            "rejected": self.rejected,
            "local_prefills": sum(1 for r in served if r.decision.prefill_worker_id is None),
            # Prefill workers' busy time, max over min (a sink shows as a large ratio).
            "max_min_worker_load_ratio": round(max(busy) / max(min(busy), 1e-9), 2) if busy else None,
            "decode_max_min_load_ratio": round(max(decode_tokens) / max(min(decode_tokens), 1), 2),
        }


def percentile(values, q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--num-prefill", type=int, default=16)
    add("--num-decode", type=int, default=16)
    add("--num-requests", type=int, default=10_000)
    add("--request-rate", type=float, default=100.0, help="Poisson arrivals per second")
    add(
        "--workload",
        choices=["random", "prefix-sharing", "multi-turn"],
        default="prefix-sharing",
        help="random: fresh prompts of 0.5-1.5x (shared+question) tokens; prefix-sharing: each request "
        "draws one of num-groups x prompts-per-group prompts; multi-turn: num-groups live conversations, "
        "each turn = previous prompt + answer + question, ~prompts-per-group turns each",
    )
    add("--num-groups", type=int, default=64)
    add("--prompts-per-group", type=int, default=16)
    add("--shared-prefix-len", type=int, default=2048)
    add("--question-len", type=int, default=128)
    add("--output-len", type=int, default=128, help="max_tokens; random draws output in [len/2, len]")
    add("--policy", action="append", help=f"repeatable; one of {sorted(POLICIES)} or 'all'")
    add("--kv-blocks-per-prefill", type=int, default=4096, help=f"{BLOCK_SIZE}-token blocks")
    add("--kv-blocks-per-decode", type=int, default=8192, help=f"{BLOCK_SIZE}-token blocks")
    add(
        "--headroom",
        choices=["committed", "reported"],
        default="committed",
        help="router headroom: committed (prompt + max_tokens of in-flight requests) or reported free blocks",
    )
    add("--no-kv-events", action="store_true", help="router predicts caches from its routing history")
    add("--report-interval-ms", type=float, default=20.0)
    add("--transfer-gbps", type=float, default=25.0, help="KV transfer bandwidth, GB/s")
    add("--max-queue-len", type=int, default=256, help="admission queue bound")
    add("--max-wait-s", type=float, default=5.0, help="admission wait bound")
    add("--ttft-slo-ms", type=float, default=500.0)
    add("--tpot-slo-ms", type=float, default=50.0)
    add(
        "--policy-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a PolicyConfig field for every policy, e.g. local_prefill_threshold_tokens=256",
    )
    add("--seed", type=int, default=0)
    add("--json", action="store_true", help="print one JSON object per policy, one per line")
    args = parser.parse_args(argv)
    names = args.policy or ["all"]
    args.policies = sorted(POLICIES) if "all" in names else names
    args.policy_params = {}
    for item in args.policy_param:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--policy-param wants KEY=VALUE, got {item!r}")
        args.policy_params[key] = float(value)
    for name in args.policies:
        try:
            make_policy(name, **args.policy_params)
        except ValueError as e:
            parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run each policy on the same arrivals; print and return one result dict each."""
    args = parse_args(argv)
    results = []
    for name in args.policies:
        requests = make_workload(args, random.Random(args.seed))
        start = time.perf_counter()
        result = {"policy": name, **Simulation(args, name, requests).run()}
        result["sim_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result) if args.json else " ".join(f"{k}={v}" for k, v in result.items()))
        results.append(result)
    return results


if __name__ == "__main__":
    main()
