"""OpenAI's response objects and stream chunks, from `RouterCore.generate`'s events.

One request may carry `n` samples (choices); each event names its sample (`index`).
`ChoiceState` gathers one choice's text, token ids and logprobs for a non-streamed answer;
`ResponseBuilder` makes the bodies. Logprobs take OpenAI's two shapes: the completions API's
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` and the chat API's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`; a token's string is its
own decoding (`token_text`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.core.outputs import TokenLogprobs
from pdserve.router.events import Chunk, Completion


@dataclass
class ChoiceState:
    """One choice of a non-streamed answer, as its events arrive."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    done: Completion | None = None

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs or []
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs


def usage_body(completions: list[Completion], prompt_tokens: int | None = None) -> dict[str, Any]:
    """Usage over a request's choices: the prompt once, every choice's completion tokens."""
    prompt = completions[0].prompt_tokens if prompt_tokens is None else prompt_tokens
    generated = sum(c.completion_tokens for c in completions)
    cached = max((c.cached_tokens for c in completions), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class ResponseBuilder:
    """The response objects of one request (ids, timestamps and model name shared)."""

    def __init__(
        self,
        model_name: str,
        chat: bool,
        prompt_token_ids: list[int] | None = None,
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        self.chat = chat
        self.prompt_token_ids = prompt_token_ids  # set: vLLM's return_token_ids
        self.token_text = token_text or str
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self._text_offsets: dict[int, int] = {}  # completions logprobs: text offset per choice

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    # -- logprobs ---------------------------------------------------------------------------
    def logprobs_body(self, index: int, logprobs: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(lp) for lp in logprobs]}
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets, offset = [], self._text_offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._text_offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                {self.token_text(lp.token_id): lp.logprob, **{self.token_text(t): v for t, v in lp.top}}
                for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def prompt_logprobs_body(self, logprobs: list[TokenLogprobs]) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: None for the first prompt token, then per token a dict of
        the prompt token and the top alternatives, {token id: {logprob, rank, decoded_token}}."""
        body: list[dict[str, Any] | None] = [None]
        for lp in logprobs:
            entry = {str(lp.token_id): self._vllm_logprob(lp.token_id, lp.logprob, lp.rank)}
            for rank, (token_id, value) in enumerate(lp.top, start=1):
                entry.setdefault(str(token_id), self._vllm_logprob(token_id, value, rank))
            body.append(entry)
        return body

    def _vllm_logprob(self, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.token_text(token_id)}

    def _chat_logprob(self, lp: TokenLogprobs) -> dict[str, Any]:
        token = self.token_text(lp.token_id)
        return {
            "token": token,
            "logprob": lp.logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": (t := self.token_text(tid)), "logprob": v, "bytes": list(t.encode())}
                for tid, v in lp.top
            ],
        }

    # -- bodies -----------------------------------------------------------------------------
    def full(self, choices: dict[int, ChoiceState], want_logprobs: bool) -> dict[str, Any]:
        bodies = []
        for index, state in sorted(choices.items()):
            text = "".join(state.texts)
            finish = state.done.finish_reason if state.done is not None else None
            logprobs = self.logprobs_body(index, state.logprobs) if want_logprobs else None
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": index, "text": text}
            choice.update(logprobs=logprobs, finish_reason=finish)
            if self.prompt_token_ids is not None:
                choice["token_ids"] = state.token_ids
            if state.prompt_logprobs is not None and not self.chat:
                choice["prompt_logprobs"] = self.prompt_logprobs_body(state.prompt_logprobs)
            bodies.append(choice)
        body = self._envelope("chat.completion" if self.chat else "text_completion", bodies)
        first = choices.get(0)
        if self.chat and first is not None and first.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs_body(first.prompt_logprobs)
        if self.prompt_token_ids is not None:
            body["prompt_token_ids"] = self.prompt_token_ids
        body["usage"] = usage_body([s.done for _, s in sorted(choices.items()) if s.done is not None])
        return body

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        token_ids: list[int] | None = None,
        logprobs: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        if self.prompt_token_ids is not None and token_ids is not None:
            choice["token_ids"] = token_ids
        body = self._envelope(self.object, [choice])
        if usage is not None:
            body["usage"] = usage
        return body

    def add_prompt_logprobs(self, body: dict[str, Any], logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        """Put a stream's prompt logprobs into its chunk (the choice's for completions, the
        chunk's own for chat, as vLLM)."""
        target = body if self.chat else body["choices"][0]
        target["prompt_logprobs"] = self.prompt_logprobs_body(logprobs)
        return body

    def usage_chunk(self, completions: list[Completion]) -> dict[str, Any]:
        body = self._envelope(self.object, [])
        body["usage"] = usage_body(completions)
        return body
