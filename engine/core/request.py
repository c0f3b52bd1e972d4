"""A request as the scheduler sees it: token ids and counters, no tensors."""

from __future__ import annotations

import enum
import time

from pdserve.engine.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Decode role: blocks reserved, the prompt's KV (and its first token) on the way from a
    # prefill worker (vLLM v1's WAITING_FOR_REMOTE_KVS). Not scheduled until it lands.
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    # Prefill role: the first token is out; the blocks stay owned until the KV has been sent.
    HELD_FOR_TRANSFER = "held_for_transfer"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_STATUS_TO_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


def validate_prompt(prompt_token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError naming what is wrong with a prompt (router and engine share this)."""
    if not prompt_token_ids:
        raise ValueError("prompt must not be empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"prompt is {len(prompt_token_ids)} tokens, the model's context is {max_model_len} "
            f"(prompt must leave room for at least one new token)"
        )


class Request:
    """One generation request: its prompt, its output so far, and its progress.

    `num_computed_tokens` counts tokens whose KV is in the cache, or is being written by
    a step already scheduled: the scheduler advances it when it schedules the tokens.
    `num_pending_tokens` counts tokens a scheduled step will sample but that are not yet
    in `all_token_ids` (under async scheduling the next step is scheduled before the
    previous one's tokens are back; the model runner reads those inputs on the device).
    """

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first schedule)
        self.num_preemptions = 0
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled lazily
        self.stop_reason: int | str | None = None
        # prompt_logprobs[i]: logprobs of prompt token i + 1 (filled chunk by chunk), when asked
        self.prompt_logprobs: list | None = None if sampling_params.prompt_logprobs is None else []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    def last_token_pending(self, max_model_len: int) -> bool:
        """True when a token is in flight and it is the last one the length limits allow,
        so scheduling this request again would only compute a token to throw away."""
        if not self.num_pending_tokens:
            return False
        num_outputs = self.num_output_tokens + self.num_pending_tokens
        return num_outputs >= self.sampling_params.max_tokens or self.num_tokens_with_pending >= max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return _STATUS_TO_REASON.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Set a finished status if the last token ends the request; return True if so."""
        params = self.sampling_params
        if self.num_output_tokens == 0:
            return False
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last == self.eos_token_id:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
