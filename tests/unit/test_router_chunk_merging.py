"""A stream's outputs that queue up while its consumer is busy leave the router as one chunk
(as vLLM's RequestOutputCollector merges them), with the engine's exact tokens, text, stop
and error handling; the first token is never held back.

The consumer here is `RouterCore.generate` itself, driven on the router's loop: a gRPC
client that reads slowly would not do, since HTTP/2 buffers the router's writes until its
flow-control window fills, so the router never falls behind in a short test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.core.outputs import RequestOutput
from pdserve.engine.llm import CompletionOutput
from pdserve.router.service import Chunk, Completion, RouterCore, RouterError
from tests.inprocess import InProcessDeployment

PROMPT = list(range(1, 41))
MAX_TOKENS = 16
WAIT_S = 30.0


@pytest.fixture(scope="module")
def dep():
    d = InProcessDeployment(num_prefill=1, num_decode=1)
    yield d
    d.close()


def wait_all_free(dep: InProcessDeployment) -> None:
    """The failed request was aborted on every worker: all KV blocks come back."""
    deadline = time.monotonic() + WAIT_S
    while not dep.all_blocks_free():
        if time.monotonic() > deadline:
            raise AssertionError([w.load() for w in dep.workers()])
        time.sleep(0.05)


def offline(params: SamplingParams) -> CompletionOutput:
    return LLM("tiny", num_gpu_blocks=512).generate([PROMPT], params)[0]


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


async def wait_until_queued(core: RouterCore, req_id: str, done: Callable[[list], bool]) -> None:
    """Stay away from the stream until `done(queued outputs)` holds: what is queued then is backlog."""
    deadline = time.monotonic() + WAIT_S
    while True:
        stream = core._streams.get(req_id)
        if stream is None or done(list(stream.queue._queue)):  # asyncio.Queue's own deque
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{req_id}: outputs did not arrive within {WAIT_S} s")
        await asyncio.sleep(0.01)


def finished_queued(items: list) -> bool:
    return any(isinstance(item, RequestOutput) and item.finished for item in items)


async def read_two_then_fall_behind(
    core: RouterCore, req_id: str, params: SamplingParams, num_tokens: int
) -> list[Chunk | Completion]:
    """Read the prefill's token and the first decode chunk (that one starts the decode), then
    stop reading until the decode worker has finished and every output is queued.
    `num_tokens`: how many the request makes in all (none left to wait for once read)."""
    events: AsyncIterator[Chunk | Completion] = core.generate(req_id, PROMPT, params)
    received = [await anext(events), await anext(events)]
    if sum(len(e.token_ids) for e in received) < num_tokens:
        await wait_until_queued(core, req_id, finished_queued)
    return received + [event async for event in events]


def test_a_consumer_that_falls_behind_gets_its_backlog_in_one_chunk(dep):
    expected = offline(greedy())
    events = dep.run(read_two_then_fall_behind(dep.core, "slow", greedy(), MAX_TOKENS))
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    # the prefill's token, the first decode step, then the other 14 steps' tokens at once
    assert len(chunks) <= 3 < MAX_TOKENS
    complete = events[-1]
    assert isinstance(complete, Completion)
    assert complete.finish_reason == "length" and complete.completion_tokens == MAX_TOKENS


def test_merged_outputs_stop_where_the_engine_stops(dep):
    """A stop string inside the backlog ends the stream exactly where the offline engine ends
    it: outputs are judged one by one, not as one merged run of text."""
    full = offline(greedy())
    stop = full.text[6:9]
    assert stop and len(full.token_ids) == MAX_TOKENS
    expected = offline(greedy(stop=[stop]))
    assert expected.finish_reason == "stop" and len(expected.token_ids) < MAX_TOKENS
    events = dep.run(
        read_two_then_fall_behind(dep.core, "stops", greedy(stop=[stop]), len(expected.token_ids))
    )
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert len(chunks) <= 3  # the stop was found inside a merged backlog
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert isinstance(events[-1], Completion) and events[-1].finish_reason == "stop"


def test_tokens_queued_before_an_error_are_delivered_then_the_error_raised(dep):
    full = offline(greedy())
    # long enough that the request is still running when the error is queued behind its outputs
    params = greedy(max_tokens=2000)

    async def run() -> tuple[list[int], RouterError]:
        events = dep.core.generate("fails", PROMPT, params)
        tokens = [*(await anext(events)).token_ids, *(await anext(events)).token_ids]
        await wait_until_queued(dep.core, "fails", lambda items: len(items) >= 2)
        dep.core._streams["fails"].queue.put_nowait(RouterError("UNAVAILABLE", "decode worker gone"))
        try:
            async for event in events:
                assert isinstance(event, Chunk), event
                tokens += event.token_ids
        except RouterError as error:
            return tokens, error
        raise AssertionError("the error was not raised")

    tokens, error = dep.run(run())
    assert error.code == "UNAVAILABLE"
    assert len(tokens) >= 4  # the two read before, then the two or more queued before the error
    assert tokens[:MAX_TOKENS] == full.token_ids[: len(tokens)]
    wait_all_free(dep)


def test_a_consumer_that_keeps_up_gets_the_first_token_in_a_chunk_of_its_own(dep):
    """Merging takes only what is already queued: the prefill's token is not held back to
    wait for the decode worker's."""
    expected = offline(greedy())

    async def run() -> list[Chunk | Completion]:
        return [event async for event in dep.core.generate("fast", PROMPT, greedy())]

    events = dep.run(run())
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert chunks[0].token_ids == expected.token_ids[:1]
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
