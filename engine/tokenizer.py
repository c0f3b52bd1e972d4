"""Tokenizers and incremental detokenization for streaming.

`HFTokenizer` wraps a `tokenizer.json` through the `tokenizers` library;
`ByteTokenizer` is the tiny preset's byte-level vocabulary. `IncrementalDetokenizer`
turns a growing list of token ids into text deltas and holds back any tail that
decodes to an incomplete UTF-8 character, so a stream never splits one.
"""

from __future__ import annotations

import os
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """Bytes 0-255 are their own ids; 256 = <bos>, 257 = <eos>."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    SPECIAL_TEXT = {256: "<bos>", 257: "<eos>"}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")
        parts: list[str] = []
        run: list[int] = []
        for t in token_ids:
            if t < 256:
                run.append(t)
                continue
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            parts.append(self.SPECIAL_TEXT.get(t, ""))
            run = []
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    def __init__(self, path: str, eos_token_id: int | None, bos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(model: str, eos_token_id: int | None, bos_token_id: int | None) -> Tokenizer | None:
    """The tokenizer for a model directory or preset; None if the directory has none."""
    if model == "tiny":
        return ByteTokenizer()
    if os.path.isfile(os.path.join(model, "tokenizer.json")):
        return HFTokenizer(model, eos_token_id, bos_token_id)
    return None


class IncrementalDetokenizer:
    """Text deltas from a growing token list (the prefix/read offset method).

    Decoding a window that starts a few tokens back keeps tokenizers that merge
    spaces or bytes across tokens right; a delta ending in U+FFFD is held back
    until the next token completes the character.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - 6, 0)
        self.read_offset = len(self.token_ids)
        self.output_text = ""

    def add_tokens(self, new_token_ids: list[int]) -> str:
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.output_text += delta
            return delta
        return ""

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def flush(self) -> str:
        """At the end of a stream, release whatever is held back (even a broken character)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta
