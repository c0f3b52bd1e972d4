"""Chat prompts rendered as transformers renders them (`tokenizer.apply_chat_template`).

The template comes from the model's `tokenizer_config.json` (`chat_template`, a string or a
list of named templates: "default" is taken), or a `chat_template.jinja` file beside it.
It renders in the same sandboxed jinja2 environment as transformers' (trim_blocks,
lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`), with the
tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables, and the result is
tokenized without adding special tokens, as `apply_chat_template(tokenize=True)` does.

The tiny preset has no tokenizer config; it gets `TINY_CHAT_TEMPLATE`, a plain one so that
the quick-start deployment answers chat requests too.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.engine.tokenizer import Tokenizer

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad shape, or the template raised): a 400."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    @classmethod
    def from_model(cls, model: str) -> ChatTemplate | None:
        """The template of a model directory (or the tiny preset); None if it has none."""
        if model == "tiny":
            return cls(TINY_CHAT_TEMPLATE)
        config: dict[str, Any] = {}
        config_path = os.path.join(model, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_path = os.path.join(model, "chat_template.jinja")
        if source is None and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        if not source:
            return None
        special = {k: text for k in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(k))) is not None}
        return cls(source, special)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text; raises ChatTemplateError naming what is wrong."""
        check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                tools=kwargs.pop("tools", None),
                documents=kwargs.pop("documents", None),
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"messages: the chat template refused them: {exc}") from exc

    def encode(
        self, tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Rendered and tokenized without added special tokens (the template writes its own)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}]: must be an object with role and content")
        if message.get("role") not in MESSAGE_ROLES:
            raise ChatTemplateError(f"messages[{i}].role: must be one of {', '.join(MESSAGE_ROLES)}")
        content = message.get("content")
        if not (content is None or isinstance(content, str) or isinstance(content, list)):
            raise ChatTemplateError(f"messages[{i}].content: must be a string or a list of parts")
