"""Scheduler properties, checked without tensors: a fake step samples token 1 for every row."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerConfig


def make_scheduler(num_blocks=32, block_size=4, max_num_seqs=4, budget=16):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len=10_000), kv)


def run_step(sched: Scheduler, step_no: int, seen: dict):
    out = sched.schedule()
    bs = sched.kv.block_size
    assert out.total_num_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    slots = set()
    for e in out.scheduled:
        req = sched.requests[e.req_id]
        # every scheduled token has a slot in the request's blocks, and no slot is shared
        assert len(e.block_ids) * bs >= e.num_computed_tokens + e.num_new_tokens
        for pos in range(e.num_computed_tokens, e.num_computed_tokens + e.num_new_tokens):
            slot = e.block_ids[pos // bs] * bs + pos % bs
            assert slot not in slots
            slots.add(slot)
        assert e.num_computed_tokens + e.num_new_tokens <= req.num_tokens
        seen.setdefault(e.req_id, step_no)
    sampled = {e.req_id: 1 for e in out.scheduled if e.sample}
    sched.update(out, sampled)
    return out


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    max_tokens=st.integers(1, 12),
    num_blocks=st.integers(14, 40),
    budget=st.integers(4, 48),
    abort_every=st.integers(0, 5),
)
def test_everything_finishes_and_frees(prompts, max_tokens, num_blocks, budget, abort_every):
    sched = make_scheduler(num_blocks=num_blocks, budget=budget)
    for i, n in enumerate(prompts):
        sched.add_request(Request(f"r{i}", [i % 3] * n, SamplingParams(max_tokens=max_tokens)))
    seen: dict = {}
    steps = 0
    while sched.num_unfinished:
        run_step(sched, steps, seen)
        steps += 1
        if abort_every and steps % abort_every == 0 and sched.running:
            sched.abort(sched.running[0].req_id)
        assert steps < 2000, "scheduler made no progress"
    assert not sched.requests
    assert sched.kv.num_free_blocks == num_blocks
    assert all(c == 0 for c in sched.kv.pool.ref_counts)


def test_fcfs_first_schedule_order_and_no_starvation():
    sched = make_scheduler(num_blocks=12, budget=8, max_num_seqs=2)
    for i in range(6):
        sched.add_request(Request(f"r{i}", [7] * 10, SamplingParams(max_tokens=3)))
    seen: dict = {}
    step = 0
    while sched.num_unfinished:
        run_step(sched, step, seen)
        step += 1
    order = sorted(seen, key=lambda r: seen[r])
    assert order == [f"r{i}" for i in range(6)]


def test_chunked_prefill_splits_long_prompt():
    sched = make_scheduler(num_blocks=40, budget=8)
    sched.add_request(Request("long", list(range(30)), SamplingParams(max_tokens=2)))
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 8 and not out.scheduled[0].sample
    sched.update(out, {})
    out = sched.schedule()
    assert out.scheduled[0].num_computed_tokens == 8


def test_preemption_recomputes_latest_request():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    sched.add_request(Request("a", [1] * 8, SamplingParams(max_tokens=20)))
    sched.add_request(Request("b", [2] * 8, SamplingParams(max_tokens=20)))
    seen: dict = {}
    for step in range(30):
        out = run_step(sched, step, seen)
        if out.preempted_req_ids:
            assert out.preempted_req_ids == ["b"]
            break
    else:
        raise AssertionError("expected a preemption")
    assert sched.requests["b"].num_computed_tokens == 0
