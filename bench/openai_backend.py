"""`pdserve bench serve --backend openai`: the same load against any OpenAI-compatible server.

Requests go to `POST {url}/v1/completions` as token-id prompts with `max_tokens`,
`ignore_eos` (vLLM's and pdserve's extra field) and `stream_options.include_usage`, so
vLLM, SGLang and pdserve's own HTTP API can be measured side by side with the gRPC path.
Timing follows vLLM's `bench serve` for its openai backend: TTFT at the first event with
text, ITL between events with text; the output token count is the server's usage.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestResult
from pdserve.router.client import ModelInfo


class OpenAIBackendError(RuntimeError):
    pass


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON events of an OpenAI server-sent-event stream, then None for `data: [DONE]`;
    an error event raises OpenAIBackendError."""
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            yield None
            return
        event = json.loads(payload)
        if "error" in event:
            raise OpenAIBackendError(event["error"].get("message", str(event["error"])))
        yield event


def base_url(url: str) -> str:
    """http://HOST:PORT from what a user may type (HOST:PORT, a trailing /v1 or /)."""
    url = url if "://" in url else f"http://{url}"
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class OpenAISender:
    """One aiohttp session; `send` streams one completion and times it."""

    def __init__(self, url: str, model: str | None = None, max_connections: int = 0) -> None:
        self.url = base_url(url)
        self.model = model
        self._connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAISender:
        connector = aiohttp.TCPConnector(limit=self._connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self, timeout: float) -> None:
        """Poll /v1/models until the server lists a model; take the first unless one was named."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                async with self._session.get(self.url + "/v1/models") as response:
                    if response.status == 200:
                        models = [m["id"] for m in (await response.json())["data"]]
                        if self.model is None and models:
                            self.model = models[0]
                        return
                    last_error = f"HTTP {response.status}"
            except aiohttp.ClientError as exc:
                last_error = str(exc)
            await asyncio.sleep(0.5)
        raise OpenAIBackendError(f"{self.url}/v1/models did not answer within {timeout:g} s ({last_error})")

    async def model_info(self, vocab_size: int | None) -> ModelInfo:
        """What the workload needs; OpenAI's API names no vocabulary, so --vocab-size must."""
        if vocab_size is None:
            raise OpenAIBackendError("--backend openai needs --vocab-size (the API does not report it)")
        async with self._session.get(self.url + "/v1/models") as response:
            entry = next(m for m in (await response.json())["data"] if m["id"] == self.model)
        return ModelInfo(
            model_name=self.model,
            vocab_size=vocab_size,
            max_model_len=entry.get("max_model_len") or 0,
            block_size=0,
            eos_token_id=None,
            num_prefill_workers=0,
            num_decode_workers=0,
        )

    async def send(self, request: BenchRequest, temperature: float, deadline: float) -> RequestResult:
        result = RequestResult(prompt_len=request.prompt_len)
        body = {
            "model": self.model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.output_len,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = last_at = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic()))
            async with self._session.post(
                self.url + "/v1/completions", json=body, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise OpenAIBackendError(f"HTTP {response.status}: {(await response.text())[:500]}")
                await self._read_stream(response, result, start, last_at)
        except (aiohttp.ClientError, asyncio.TimeoutError, OpenAIBackendError) as error:
            result.success, result.error = False, str(error) or type(error).__name__
        return result

    @staticmethod
    async def _read_stream(
        response: aiohttp.ClientResponse, result: RequestResult, start: float, last_at: float
    ) -> None:
        done, seen_text = False, False
        async for event in sse_events(response):
            if event is None:  # data: [DONE]
                done = True
                break
            now = time.perf_counter()
            result.request_id = event.get("id") or result.request_id
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    if not seen_text:
                        result.ttft, seen_text = now - start, True
                    else:
                        result.itl.append(now - last_at)
                    last_at = now
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
            if event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
                details = event["usage"].get("prompt_tokens_details") or {}
                result.cached_tokens = details.get("cached_tokens") or 0
        result.latency = last_at - start
        result.success = done and result.output_tokens > 0 and result.finish_reason != "abort"
        if not result.success:
            result.error = f"stream ended after {result.output_tokens} tokens (finish {result.finish_reason})"
