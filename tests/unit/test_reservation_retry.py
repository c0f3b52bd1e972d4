"""A decode worker that refuses a reservation the router's books allowed (identical long
prompts in flight together: the books count their shared blocks once, the worker shares
them only once the first one's KV has landed): the request is routed again, not failed."""

from __future__ import annotations

import threading

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient
from tests.inprocess import InProcessDeployment


def test_identical_long_prompts_all_finish_on_a_small_decode_cache():
    prompt = list(range(1, 257))  # 16 blocks
    params = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = LLM("tiny", num_gpu_blocks=64).generate([prompt], SamplingParams(**params))[0].token_ids
    # 40 decode blocks: two reservations of 17 blocks fit before any KV lands, a third does not
    dep = InProcessDeployment(
        num_prefill=1,
        num_decode=1,
        engine=EngineConfig(model="tiny", num_gpu_blocks=40),
        prefill_engine=EngineConfig(model="tiny", num_gpu_blocks=256),
    )
    results: list = [None] * 6
    try:
        with PdserveClient(dep.url) as client:

            def run(i: int) -> None:
                events = list(client.generate(prompt, **params))
                tokens = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
                results[i] = (tokens, events[-1])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        for tokens, done in results:
            assert isinstance(done, GenerateComplete) and tokens == expected
        assert dep.all_blocks_free()
    finally:
        dep.close()
