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
    done: Completion | None = None

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs or []


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
            bodies.append(choice)
        body = self._envelope("chat.completion" if self.chat else "text_completion", bodies)
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

    def usage_chunk(self, completions: list[Completion]) -> dict[str, Any]:
        body = self._envelope(self.object, [])
        body["usage"] = usage_body(completions)
        return body
