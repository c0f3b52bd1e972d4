"""Streams prompts through a router and prints what came back, as JSON: run by
test_two_hosts inside a network namespace (`ip netns exec NS python -m tests.e2e.netns_client`).

stdin: {"url": "HOST:PORT", "prompts": [[ids...], ...], "max_tokens": N}
stdout: [{"tokens": [...], "finish_reason": "...", "cached_tokens": N}, ...]
"""

from __future__ import annotations

import asyncio
import json
import sys

from pdserve.router.client import AsyncPdserveClient, GenerateChunk, GenerateComplete


async def stream_all(url: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    async with AsyncPdserveClient(url) as client:
        await client.wait_ready(60)

        async def one(prompt: list[int]) -> dict:
            tokens: list[int] = []
            complete = None
            async for event in client.generate(
                prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ):
                if isinstance(event, GenerateChunk):
                    tokens.extend(event.token_ids)
                elif isinstance(event, GenerateComplete):
                    complete = event
            return {
                "tokens": tokens,
                "finish_reason": complete.finish_reason if complete else None,
                "cached_tokens": complete.usage.cached_tokens if complete else 0,
            }

        return await asyncio.gather(*(one(p) for p in prompts))


def main() -> None:
    job = json.load(sys.stdin)
    print(json.dumps(asyncio.run(stream_all(job["url"], job["prompts"], job["max_tokens"]))))


if __name__ == "__main__":
    main()
