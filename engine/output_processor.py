"""Token ids -> streamed text, with stop strings. Used by the offline LLM and the router.

The engine core deals in token ids only; this front-end piece turns each
request's new tokens into text deltas (never splitting a UTF-8 character) and
ends a request when a stop string appears, cutting the text before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TextDelta:
    token_ids: list[int]
    text: str
    stopped: bool = False  # a stop string ended the request


@dataclass
class RequestTextState:
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    num_output_tokens: int = 0
    emitted_text_len: int = 0
    stopped: bool = False
    token_ids: list[int] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestTextState] = {}

    def add(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        if params.stop and detok is None:
            raise ValueError("stop strings need a tokenizer; this model has no tokenizer.json")
        self.states[req_id] = RequestTextState(params, detok)

    def process(self, req_id: str, new_token_ids: list[int], finished: bool) -> TextDelta:
        """Text for new tokens. After `stopped`, the caller must abort the request."""
        state = self.states[req_id]
        if state.stopped:
            return TextDelta([], "", stopped=True)
        state.token_ids.extend(new_token_ids)
        state.num_output_tokens += len(new_token_ids)
        if state.detok is None:
            return TextDelta(list(new_token_ids), "")
        state.detok.add_tokens(new_token_ids)
        if finished:
            state.detok.flush()
        text = state.detok.output_text
        stop = self._find_stop(state, text)
        if stop is not None:
            start, length = stop
            cut = start + length if state.params.include_stop_str_in_output else start
            state.stopped = True
            delta = text[state.emitted_text_len : cut]
            state.emitted_text_len = cut
            return TextDelta(list(new_token_ids), delta, stopped=True)
        # Hold back the tail that may be the start of a stop string (vLLM's stop buffer): text
        # once streamed cannot be taken back when the rest of the stop string arrives.
        hold = max(len(s) for s in state.params.stop) - 1 if state.params.stop and not finished else 0
        end = max(state.emitted_text_len, len(text) - hold)
        delta = text[state.emitted_text_len : end]
        state.emitted_text_len = end
        return TextDelta(list(new_token_ids), delta)

    def _find_stop(self, state: RequestTextState, text: str) -> tuple[int, int] | None:
        """(start, length) of the earliest stop string in the text not yet emitted."""
        params = state.params
        if not params.stop or state.num_output_tokens < params.min_tokens:
            return None
        longest = max(len(s) for s in params.stop)
        window_start = max(0, state.emitted_text_len - longest + 1)
        hits = [(i, len(s)) for s in params.stop if (i := text.find(s, window_start)) != -1]
        return min(hits) if hits else None

    def remove(self, req_id: str) -> None:
        self.states.pop(req_id, None)
