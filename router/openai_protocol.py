"""OpenAI's completion and chat APIs as plain data: request bodies in, response bodies out.

`parse_completion` / `parse_chat` check a decoded JSON body and turn it into what
`RouterCore.generate` takes (prompt token ids, `SamplingParams`); `ResponseBuilder` makes
the response objects and stream chunks. No I/O here: router/http_server.py serves them.

Accepted as vLLM accepts them: the OpenAI fields, and vLLM's extras `top_k`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `seed`, `return_token_ids` (each choice also carries its
`token_ids`, the response its `prompt_token_ids`), `add_generation_prompt` (chat). Fields
the engine does not implement yet answer 400 naming the field when set to anything but
their neutral value (`n` > 1, `logprobs`, `echo`, `best_of`, `logit_bias`, `suffix`, the
penalties, `min_p`, `skip_special_tokens` false, `include_stop_str_in_output` true, `tools`,
`response_format` other than text). Unknown fields are ignored, as OpenAI's server does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.request import validate_prompt
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import Completion, ModelSummary

# HTTP status and OpenAI error type per RouterError code (gRPC status names).
STATUS_OF_CODE = {
    "INVALID_ARGUMENT": (400, "BadRequestError"),
    "ALREADY_EXISTS": (400, "BadRequestError"),
    "NOT_FOUND": (404, "NotFoundError"),
    "RESOURCE_EXHAUSTED": (429, "RateLimitError"),
    "UNAVAILABLE": (503, "ServiceUnavailableError"),
}
# field -> its neutral value; anything else is refused until the engine implements it.
UNSUPPORTED_UNLESS = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "prompt_logprobs": None,
    "logit_bias": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "min_p": 0,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
    "tools": None,
    "tool_choice": None,
    "continue_final_message": False,
}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "min_tokens", "ignore_eos")


class ProtocolError(Exception):
    """A request the API refuses: HTTP status, OpenAI error type, message, offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, err_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or {404: "NotFoundError", 429: "RateLimitError"}.get(
            status, "BadRequestError"
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.status)


def error_body(message: str, err_type: str, param: str | None, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


@dataclass
class ParsedRequest:
    prompt_token_ids: list[int] | None  # None: `prompt_text` is tokenized by the router
    prompt_text: str | None
    messages: list[dict[str, Any]] | None  # chat: rendered by the model's template
    add_generation_prompt: bool
    params_kwargs: dict[str, Any]  # SamplingParams fields the request set
    max_tokens: int | None
    stream: bool
    include_usage: bool
    # vLLM's `return_token_ids`: each choice also carries `token_ids` (and the whole
    # response `prompt_token_ids`), for clients that compare tokens, not text.
    return_token_ids: bool = False
    # vLLM's `stream_options.continuous_usage_stats`: every chunk carries the usage so far.
    continuous_usage: bool = False


def _check_model(body: dict[str, Any], model: ModelSummary) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ProtocolError(404, f"The model `{name}` does not exist.", "model", "NotFoundError")


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, neutral in UNSUPPORTED_UNLESS.items():
        value = body.get(name)
        if value is not None and value != neutral and not (neutral is None and value in (False, {}, [])):
            raise ProtocolError(400, f"{name}={value!r} is not supported by pdserve yet", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ProtocolError(400, "response_format: only {'type': 'text'} is supported", "response_format")


def _common(body: dict[str, Any], model: ModelSummary) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(400, "the request body must be a JSON object")
    _check_model(body, model)
    _check_unsupported(body)
    kwargs = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ProtocolError(400, "stop: must be a string or a list of strings", "stop")
        kwargs["stop"] = stop
    if body.get("stop_token_ids") is not None:
        if not isinstance(body["stop_token_ids"], list):
            raise ProtocolError(400, "stop_token_ids: must be a list of integers", "stop_token_ids")
        kwargs["stop_token_ids"] = body["stop_token_ids"]
    return kwargs


def _max_tokens(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProtocolError(400, f"{name}: must be an integer >= 1, got {value!r}", name)
            return value
    return None


def _continuous_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("continuous_usage_stats", False))


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ProtocolError(400, "stream_options: only allowed when stream is true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    return stream, include_usage


def parse_completion(body: Any, model: ModelSummary) -> ParsedRequest:
    kwargs = _common(body, model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text, ids = None, None
    if isinstance(prompt, str) and prompt:
        text = prompt
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        ids = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ProtocolError(
            400, "prompt: batches of several prompts are not supported; send one per request", "prompt"
        )
    else:
        raise ProtocolError(400, "prompt: must be a non-empty string or a list of token ids", "prompt")
    stream, include_usage = _stream_options(body)
    # OpenAI's default for completions is 16 tokens.
    max_tokens = _max_tokens(body, "max_tokens")
    return_ids = bool(body.get("return_token_ids", False))
    parsed = ParsedRequest(ids, text, None, False, kwargs, max_tokens, stream, include_usage, return_ids)
    parsed.continuous_usage = _continuous_usage(body)
    return parsed


def _message_text(content: Any, index: int) -> Any:
    """OpenAI's content parts as the one string templates expect (text parts joined by newlines)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ProtocolError(400, f"messages[{index}].content: only text parts are supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_chat(body: Any, model: ModelSummary) -> ParsedRequest:
    kwargs = _common(body, model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(400, "messages: must be a non-empty list", "messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ProtocolError(400, f"messages[{i}]: must be an object with role and content", "messages")
        converted.append({**message, "content": _message_text(message.get("content"), i)})
    stream, include_usage = _stream_options(body)
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    add_generation_prompt = body.get("add_generation_prompt", True)
    parsed = ParsedRequest(
        None, None, converted, bool(add_generation_prompt), kwargs, max_tokens, stream, include_usage,
        bool(body.get("return_token_ids", False)),
    )  # fmt: skip
    parsed.continuous_usage = _continuous_usage(body)
    return parsed


def build_sampling(parsed: ParsedRequest, prompt_len: int, model: ModelSummary, chat: bool) -> SamplingParams:
    """The request's SamplingParams over generation_config.json's defaults. Unset max_tokens:
    generation_config's max_new_tokens, else 16 for completions and the rest of the context
    for chat (vLLM's rules)."""
    validate_prompt_len(prompt_len, model, "messages" if chat else "prompt")
    room = model.max_model_len - prompt_len
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        if "max_tokens" in model.generation_defaults:
            max_tokens = model.generation_defaults["max_tokens"]
        else:
            max_tokens = room if chat else 16
    kwargs = {**model.generation_defaults, **parsed.params_kwargs, "max_tokens": min(max_tokens, room)}
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        param = str(exc).split(" ", 1)[0]
        raise ProtocolError(400, str(exc), param) from exc


def validate_prompt_len(prompt_len: int, model: ModelSummary, what: str) -> None:
    if prompt_len >= model.max_model_len:
        raise ProtocolError(
            400,
            f"This model's maximum context length is {model.max_model_len} tokens. However, your {what} has "
            f"{prompt_len} tokens, leaving no room for a completion.",
            what,
        )


def check_prompt_ids(ids: list[int], model: ModelSummary) -> None:
    try:
        validate_prompt(ids, model.vocab_size, model.max_model_len)
    except ValueError as exc:
        raise ProtocolError(400, f"prompt: {exc}", "prompt") from exc


def usage_body(done: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class ResponseBuilder:
    """The response objects of one request (ids, timestamps and model name shared)."""

    def __init__(self, model_name: str, chat: bool, prompt_token_ids: list[int] | None = None) -> None:
        self.chat = chat
        self.prompt_token_ids = prompt_token_ids  # set: vLLM's return_token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def full(self, text: str, done: Completion, token_ids: list[int]) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.prompt_token_ids is not None:
            choice["token_ids"] = token_ids
            body["prompt_token_ids"] = self.prompt_token_ids
        body["usage"] = usage_body(done)
        return body

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        token_ids: list[int] | None = None,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if self.prompt_token_ids is not None and token_ids is not None:
            choice["token_ids"] = token_ids
        body = self._envelope(self.object, [choice])
        if usage is not None:
            body["usage"] = usage
        return body

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        body = self._envelope(self.object, [])
        body["usage"] = usage_body(done)
        return body


def models_body(model: ModelSummary, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": model.name,
                "object": "model",
                "created": created,
                "owned_by": "pdserve",
                "root": model.name,
                "max_model_len": model.max_model_len,
            }
        ],
    }
