"""2,000 requests, 20% cancelled by the client at random moments (before the first token
or after k tokens), 64 in flight, through the router's gRPC API over real in-process
workers (1P2D, gRPC KV transfer, no Ray). Afterwards: every request that was not
cancelled equals the offline engine's tokens, none is duplicated, lost or truncated,
every worker reports all its KV blocks free, and a new request succeeds."""

from __future__ import annotations

import random
import time

import grpc
import pytest

from pdserve.bench.soak import SoakRequest, classify_outcome, make_requests, run_soak
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.router.client import PdserveError
from tests.inprocess import InProcessDeployment

NUM_REQUESTS = 2000
CANCEL_FRACTION = 0.2
MAX_TOKENS = 6
NUM_PROMPTS = 200


@pytest.fixture(scope="module")
def dep():
    engine = EngineConfig(model="tiny", num_gpu_blocks=512, max_num_seqs=64)
    d = InProcessDeployment(num_prefill=1, num_decode=2, engine=engine, policy="cache_aware", http=False)
    yield d
    d.close()


def wait_all_free(dep: InProcessDeployment, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dep.all_blocks_free() and not dep.core.status()["num_streams"]:
            return
        time.sleep(0.05)
    raise AssertionError([w.load() for w in dep.workers()])


@pytest.mark.timeout(120)
def test_cancel_storm_leaves_exact_outputs_and_no_blocks(dep):
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(4, 48))] for _ in range(NUM_PROMPTS)]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny", num_gpu_blocks=1024).generate(prompts, greedy)]
    requests = make_requests(NUM_REQUESTS, prompts, expected, CANCEL_FRACTION, MAX_TOKENS, seed=11)
    num_cancels = sum(r.cancel_after_tokens is not None for r in requests)
    assert 0.17 * NUM_REQUESTS < num_cancels < 0.23 * NUM_REQUESTS

    report = dep.run(
        run_soak(dep.url, requests, MAX_TOKENS, concurrency=64, request_timeout_s=60), timeout=100
    )

    counts = report.as_dict()["counts"]
    assert sum(counts.values()) == NUM_REQUESTS
    # Every request not cancelled came out whole and exact; a cancelled one may also have
    # finished first (its cancel moment after its last token).
    assert counts["ok"] >= NUM_REQUESTS - num_cancels, report.as_dict()
    assert counts["cancelled"] > 0.5 * num_cancels, report.as_dict()
    assert counts["ok"] + counts["cancelled"] == NUM_REQUESTS, report.as_dict()
    wait_all_free(dep)
    fresh = make_requests(4, prompts, expected, 0.0, MAX_TOKENS)
    after = dep.run(run_soak(dep.url, fresh, MAX_TOKENS, concurrency=4, id_prefix="after"))
    assert after.as_dict()["counts"]["ok"] == 4, after.as_dict()
    wait_all_free(dep)


def test_run_soak_counts_every_outcome_kind():
    """The accounting itself: a request that was cut short, repeated or changed never
    counts as ok (so the storm test above can fail)."""
    req = SoakRequest([1, 2], [5, 6, 7], None)
    assert classify_outcome(req, [5, 6, 7], 1, None).outcome == "ok"
    assert classify_outcome(req, [5, 6], 1, None).outcome == "mismatched"  # truncated
    assert classify_outcome(req, [5, 6, 7, 7], 1, None).outcome == "duplicated"
    assert classify_outcome(req, [5, 6, 7], 2, None).outcome == "duplicated"
    assert classify_outcome(req, [5, 7], 0, None, cancelled=True).outcome == "mismatched"
    assert classify_outcome(req, [5], 0, None, cancelled=True).outcome == "cancelled"
    assert classify_outcome(req, [5], 0, None).outcome == "lost"
    err = PdserveError(grpc.StatusCode.UNAVAILABLE, "request x lost its worker")
    assert classify_outcome(req, [5], 0, err).outcome == "failed_with_status"
    assert (
        classify_outcome(req, [5], 0, PdserveError(grpc.StatusCode.INTERNAL, "boom")).outcome
        == "failed_undocumented"
    )
    assert (
        classify_outcome(req, [], 0, PdserveError(grpc.StatusCode.UNAVAILABLE, "")).outcome
        == "failed_undocumented"
    )


def test_cancel_moments_cover_before_first_token_and_mid_stream():
    reqs = make_requests(1000, [[1]], [[0] * MAX_TOKENS], CANCEL_FRACTION, MAX_TOKENS)
    moments = {r.cancel_after_tokens for r in reqs if r.cancel_after_tokens is not None}
    assert moments == set(range(MAX_TOKENS))
