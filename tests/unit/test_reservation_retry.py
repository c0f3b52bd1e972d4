"""Identical long prompts in flight together on a small decode cache: the router's books count
their shared prompt blocks only once the first one's KV has landed, as the worker shares them,
so the worker never refuses a reservation the books allowed. The re-route stays as the safety
net for what the books cannot see (memory the router did not cause): a refused reservation is
routed again, not failed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient
from tests.inprocess import InProcessDeployment

PROMPT = list(range(1, 257))  # 16 blocks
PARAMS = dict(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return LLM("tiny", num_gpu_blocks=64).generate([PROMPT], SamplingParams(**PARAMS))[0].token_ids


@pytest.fixture
def dep() -> Iterator[InProcessDeployment]:
    # 40 decode blocks: two reservations of 17 blocks fit before any KV lands, a third does not
    d = InProcessDeployment(
        num_prefill=1,
        num_decode=1,
        engine=EngineConfig(model="tiny", num_gpu_blocks=40),
        prefill_engine=EngineConfig(model="tiny", num_gpu_blocks=256),
    )
    yield d
    d.close()


def record_reservations(dep: InProcessDeployment, before_first=None) -> list[bool]:
    """Wrap the decode worker's real `reserve`: whether each call got blocks, in order.
    `before_first()` runs once, before the first call goes through."""
    decode = dep.decode["decode-0"]
    real = decode.reserve
    granted: list[bool] = []

    def reserve(*args):
        if before_first is not None and not granted:
            before_first()
        handle = real(*args)
        granted.append(handle is not None)
        return handle

    decode.reserve = reserve
    return granted


def generate_all(dep: InProcessDeployment, num: int) -> list[tuple[list[int], object]]:
    results: list = [None] * num
    with PdserveClient(dep.url) as client:

        def run(i: int) -> None:
            events = list(client.generate(PROMPT, **PARAMS))
            tokens = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
            results[i] = (tokens, events[-1])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(num)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    return results


def test_identical_long_prompts_are_booked_as_the_worker_shares_them(dep, expected):
    granted = record_reservations(dep)
    results = generate_all(dep, 6)
    for tokens, done in results:
        assert isinstance(done, GenerateComplete) and tokens == expected
    assert granted == [True] * 6  # the books never allowed one the worker had to refuse
    assert dep.all_blocks_free()


def test_a_reservation_the_worker_refuses_is_routed_again(dep, expected):
    """Blocks taken behind the router's back (a reservation made on the worker directly, freed
    0.3 s later): the worker refuses the first reservation, the request waits and gets in."""
    decode = dep.decode["decode-0"]
    reserve = decode.reserve  # the worker's own, not the recording wrapper

    def occupy() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        assert reserve("outside", [0] * 480, params) is not None  # 31 of 40 blocks
        threading.Timer(0.3, decode.abort, ("outside",)).start()

    granted = record_reservations(dep, before_first=occupy)
    results = generate_all(dep, 1)
    tokens, done = results[0]
    assert isinstance(done, GenerateComplete) and tokens == expected
    assert granted[0] is False and granted[-1] is True
    assert dep.all_blocks_free()
