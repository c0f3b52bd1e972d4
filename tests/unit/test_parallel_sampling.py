"""`n` parallel samples through the router's gRPC API over real in-process workers: each
sample equals the offline engine's run with seed + index, samples after the first reuse
the prompt's cached blocks, and an abort or a cancel ends every sample and frees its blocks."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient, PdserveError
from tests.inprocess import InProcessDeployment

PROMPT = list(range(30, 80))  # 50 tokens: three full blocks to share


@pytest.fixture(scope="module", params=[1, 0], ids=["disaggregated", "colocated"])
def dep(request):
    d = InProcessDeployment(num_prefill=request.param, num_decode=1, policy="cache_aware")
    yield d
    d.close()


def wait_all_free(dep: InProcessDeployment, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not dep.all_blocks_free():
        assert time.monotonic() < deadline, [w.load() for w in dep.workers()]
        time.sleep(0.05)


def by_index(events) -> tuple[dict[int, list[int]], dict[int, GenerateComplete]]:
    tokens: dict[int, list[int]] = {}
    completes: dict[int, GenerateComplete] = {}
    for event in events:
        if isinstance(event, GenerateChunk):
            tokens.setdefault(event.index, []).extend(event.token_ids)
        else:
            assert event.index not in completes, "one Complete per sample"
            completes[event.index] = event
    return tokens, completes


def test_seeded_samples_equal_offline_runs_with_seed_plus_index(dep):
    fields = dict(temperature=0.9, max_tokens=8, ignore_eos=True, seed=7)
    offline = LLM("tiny", num_gpu_blocks=256)
    expected = [
        offline.generate([PROMPT], SamplingParams(**{**fields, "seed": 7 + i}))[0].token_ids for i in range(4)
    ]
    assert len({tuple(e) for e in expected}) > 1  # the seeds differ, so the samples do
    with PdserveClient(dep.url) as client:
        tokens, completes = by_index(client.generate(PROMPT, n=4, **fields))
    assert tokens == dict(enumerate(expected))
    assert sorted(completes) == [0, 1, 2, 3]
    assert all(c.usage.completion_tokens == 8 for c in completes.values())
    # samples after the first found the prompt's full blocks cached
    assert all(completes[i].usage.cached_tokens >= 48 for i in (1, 2, 3))
    wait_all_free(dep)


def test_abort_by_request_id_ends_every_sample(dep):
    events: list = []
    errors: list = []

    def run(client):
        try:
            for event in client.generate(PROMPT, n=3, max_tokens=1000, ignore_eos=True, request_id="fam"):
                events.append(event)
        except PdserveError as exc:  # noqa: PERF203
            errors.append(exc)

    with PdserveClient(dep.url) as client:
        thread = threading.Thread(target=run, args=(client,))
        thread.start()
        deadline = time.monotonic() + 20
        while len({e.index for e in events if isinstance(e, GenerateChunk)}) < 3:
            assert time.monotonic() < deadline and thread.is_alive(), (events, errors)
            time.sleep(0.02)
        assert client.abort("fam")
        thread.join(20)
    assert not thread.is_alive() and not errors
    _, completes = by_index(events)
    assert sorted(completes) == [0, 1, 2]
    assert {c.finish_reason for c in completes.values()} == {"abort"}
    wait_all_free(dep)


def test_cancel_frees_every_sample_and_n_is_bounded(dep):
    with PdserveClient(dep.url) as client:
        stream = client.generate(PROMPT, n=3, max_tokens=1000, ignore_eos=True)
        seen = set()
        for event in stream:
            seen.add(event.index)
            if len(seen) == 3:
                break
        stream.close()  # cancels the call
        wait_all_free(dep)
        with pytest.raises(PdserveError) as err:
            list(client.generate(PROMPT, n=65))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "n must be" in err.value.message
