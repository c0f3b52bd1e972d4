"""One step's sampled tokens (and the logprobs requests asked for), launched on the device
and read on the host one step later (async scheduling)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pdserve.engine.core.outputs import TokenLogprobs
from pdserve.engine.sampler import LogprobsTensors, PromptLogprobRows, SamplingRow


@dataclass
class StepLogprobs:
    """What a step computes beyond tokens for the requests that ask: the sampled rows'
    logprobs (their row indices, then the tensors) and prompt logprobs per segment."""

    sampled: tuple[list[int], LogprobsTensors] | None = None
    prompt: tuple[list[PromptLogprobRows], LogprobsTensors] | None = None

    def to_host(self) -> StepLogprobs:
        sampled = prompt = None
        if self.sampled is not None:
            sampled = (self.sampled[0], self.sampled[1].to_host())
        if self.prompt is not None:
            prompt = (self.prompt[0], self.prompt[1].to_host())
        return StepLogprobs(sampled, prompt)


class SampledTokens:
    """One step's sampled tokens: on the device at once, on the host after `wait()`.

    tokens: [n] int64 on the device, row i for req_ids[i]; the next step reads in-flight
    input tokens from here. On CUDA a non-blocking copy into pinned memory and an event
    let the host go on (schedule and launch the next step) while the GPU works. The
    logprobs of requests that asked for them come back with the same event.
    """

    def __init__(
        self,
        req_ids: list[str],
        tokens: torch.Tensor,
        host: torch.Tensor,
        ready,
        rows: list[SamplingRow] | None = None,
        logprobs: StepLogprobs | None = None,
    ) -> None:
        self.req_ids = req_ids
        self.tokens = tokens
        self._host = host
        self._ready = ready  # torch.cuda.Event or None
        self._rows = rows or []
        self._logprobs = logprobs  # on the host once `_ready` has fired

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """req_id -> row of `tokens`; built only when a next step reads an in-flight token."""
        return {req_id: i for i, req_id in enumerate(self.req_ids)}

    @classmethod
    def launch(
        cls,
        req_ids: list[str],
        tokens: torch.Tensor,
        rows: list[SamplingRow] | None = None,
        logprobs: StepLogprobs | None = None,
    ) -> SampledTokens:
        if tokens.device.type != "cuda":
            return cls(req_ids, tokens, tokens, None, rows, logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        if logprobs is not None:
            logprobs = logprobs.to_host()
        ready = torch.cuda.Event()
        ready.record()
        return cls(req_ids, tokens, host, ready, rows, logprobs)

    def wait(self) -> dict[str, int]:
        """Block until the step is done; its tokens by req_id."""
        if self._ready is not None:
            self._ready.synchronize()
        return dict(zip(self.req_ids, self._host.tolist(), strict=True))

    def logprobs_by_req(self) -> dict[str, TokenLogprobs]:
        """After `wait()`: the sampled tokens' logprobs of the requests that asked, by req_id."""
        if self._logprobs is None or self._logprobs.sampled is None:
            return {}
        wanted, tensors = self._logprobs.sampled
        tokens = self._host.tolist()
        lps = tensors.to_list([tokens[i] for i in wanted], [self._rows[i].params.logprobs for i in wanted])
        return {self.req_ids[i]: lp for i, lp in zip(wanted, lps, strict=True)}

    def prompt_logprobs(self) -> list[tuple[PromptLogprobRows, list[TokenLogprobs]]]:
        """After `wait()`: each prompt-logprob segment of the step with its logprobs."""
        if self._logprobs is None or self._logprobs.prompt is None:
            return []
        segments, tensors = self._logprobs.prompt
        targets = [t for seg in segments for t in seg.token_ids]
        lps = tensors.to_list(targets, [seg.num_top for seg in segments for _ in seg.token_ids])
        out, at = [], 0
        for seg in segments:
            out.append((seg, lps[at : at + len(seg.token_ids)]))
            at += len(seg.token_ids)
        return out
