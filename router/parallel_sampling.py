"""`n` samples of one prompt (the OpenAI and vLLM `n`) as n child requests of the router.

Sample 0 keeps the request's id and runs alone until its first token: by then its prompt
blocks sit in the prefix caches of the workers it used, and the locality policy sends the
other samples there, so they compute (and ship) only what the cache lacks. Samples
1..n-1 run as `<req_id>/<i>` (ids of that form are reserved for them); with a seed, sample
i draws from seed + i, as in vLLM. Events carry their sample's index; the stream ends
after every sample's `Completion`. A failing sample ends them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import Chunk, Completion

Event = Chunk | Completion
GenerateFn = Callable[[str, list[int], SamplingParams], AsyncIterator[Event]]


def sample_id(req_id: str, index: int) -> str:
    return req_id if index == 0 else f"{req_id}/{index}"


def is_sample_of(child_id: str, req_id: str) -> bool:
    return child_id == req_id or child_id.startswith(req_id + "/")


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    seed = params.seed if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


async def generate_samples(
    generate: GenerateFn, req_id: str, prompt: list[int], params: SamplingParams
) -> AsyncIterator[Event]:
    """Stream params.n samples of `prompt` through `generate` (one request's stream)."""
    queue: asyncio.Queue[tuple[Event | BaseException | None, int]] = asyncio.Queue()
    first_token = asyncio.Event()

    async def pump(index: int) -> None:
        try:
            async for event in generate(sample_id(req_id, index), prompt, sample_params(params, index)):
                if isinstance(event, Chunk):
                    first_token.set()
                await queue.put((dataclasses.replace(event, index=index), index))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((exc, index))
            first_token.set()
            return
        first_token.set()  # a sample that ended before any token still lets the others go
        await queue.put((None, index))

    tasks = [asyncio.create_task(pump(0))]
    try:
        await first_token.wait()
        tasks += [asyncio.create_task(pump(i)) for i in range(1, params.n)]
        num_done = 0
        while num_done < params.n:
            item, _ = await queue.get()
            if item is None:
                num_done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # each sample's stream aborts its request on the workers
        await asyncio.gather(*tasks, return_exceptions=True)
