"""OpenAI's completion and chat APIs as plain data: request bodies in, response bodies out.

`parse_completion` / `parse_chat` check a decoded JSON body and turn it into what
`RouterCore.generate` takes (prompt token ids, `SamplingParams`); `ResponseBuilder` makes
the response objects and stream chunks. No I/O here: router/http_server.py serves them.

Accepted as OpenAI and vLLM accept them: `n` (choices; sample i seeded seed + i),
`logprobs` (completions: an integer; chat: `logprobs` with `top_logprobs`), the penalties,
and vLLM's extras `top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `seed`,
`repetition_penalty`, `return_token_ids` (each choice also carries its `token_ids`, the
response its `prompt_token_ids`), `return_tokens_as_token_ids` (logprobs name tokens
"token_id:N"), `prompt_logprobs` (vLLM's shape: per prompt position, None for the first,
then {token id: {logprob, rank, decoded_token}}), `skip_special_tokens`,
`include_stop_str_in_output`, `add_generation_prompt` (chat). Fields not implemented
yet answer 400 naming the field when set to anything but their neutral value (`echo`,
`best_of`, `logit_bias`, `suffix`, `tools`, `response_format` other than text). Unknown
fields are ignored, as OpenAI's server does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.request import validate_prompt
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import ModelSummary

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
    "best_of": 1,
    "echo": False,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "continue_final_message": False,
}
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "seed", "min_tokens", "ignore_eos", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
    "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip


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
    # vLLM's `return_tokens_as_token_ids`: logprobs name tokens "token_id:N", not their text
    # (several ids can decode to the same text, e.g. the halves of a UTF-8 character).
    tokens_as_ids: bool = False


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
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise ProtocolError(
                400, f"logprobs: must be an integer (0..20) or null, got {logprobs!r}", "logprobs"
            )
        kwargs["logprobs"] = logprobs
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
    parsed.tokens_as_ids = bool(body.get("return_tokens_as_token_ids", False))
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
    top = body.get("top_logprobs")
    if body.get("logprobs"):
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise ProtocolError(400, f"top_logprobs: must be an integer (0..20), got {top!r}", "top_logprobs")
        kwargs["logprobs"] = top or 0
    elif top is not None:
        raise ProtocolError(400, "top_logprobs: only allowed when logprobs is true", "top_logprobs")
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
    parsed.tokens_as_ids = bool(body.get("return_tokens_as_token_ids", False))
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
    if parsed.max_tokens is None:
        max_tokens = min(max_tokens, room)  # a default fits the context; an explicit value
        # beyond it is refused by the router core with both numbers, as vLLM does
    kwargs = {**model.generation_defaults, **parsed.params_kwargs, "max_tokens": max_tokens}
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
