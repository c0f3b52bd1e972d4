"""The offline API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.outputs import TokenLogprobs
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.output_processor import OutputProcessor
from pdserve.engine.tokenizer import load_tokenizer


@dataclass
class CompletionOutput:
    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    finish_reason: str  # "stop" | "length"
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] | None = None  # per token, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., when asked for


class LLM:
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        block_size: int = 16,
        num_gpu_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        host_cache_gb: float = 0.0,
        num_host_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        attention_backend: str = "auto",
        load_format: str = "auto",
        enforce_eager: bool = False,
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
        tensor_parallel_shared_device: bool = False,
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(
                model=model,
                device=device,
                dtype=dtype,
                block_size=block_size,
                num_gpu_blocks=num_gpu_blocks,
                enable_prefix_caching=enable_prefix_caching,
                host_cache_gb=host_cache_gb,
                num_host_blocks=num_host_blocks,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                attention_backend=attention_backend,
                load_format=load_format,
                enforce_eager=enforce_eager,
                async_scheduling=async_scheduling,
                tensor_parallel_size=tensor_parallel_size,
                tensor_parallel_shared_device=tensor_parallel_shared_device,
                kv_events=False,  # no router reads them
            )
        )
        mc = self.engine.model_config
        self.tokenizer = load_tokenizer(model, mc.eos_token_id, mc.bos_token_id)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass prompts as lists of token ids")
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        if params is None:
            params = SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        processor = OutputProcessor(self.tokenizer)
        order: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                ids = self.encode(prompt)
                req_id = engine.new_request_id()
                engine.add_request(req_id, ids, p)
                processor.add(req_id, ids, p)
                order.append(req_id)
                prompt_ids[req_id] = ids
        except Exception:
            for req_id in order:
                engine.abort_request(req_id)
            raise
        results: dict[str, CompletionOutput] = {}
        texts: dict[str, list[str]] = {r: [] for r in order}
        tokens: dict[str, list[int]] = {r: [] for r in order}
        logprobs: dict[str, list[TokenLogprobs]] = {r: [] for r in order}
        prompt_logprobs: dict[str, list[TokenLogprobs] | None] = {}
        while engine.has_unfinished():
            for out in engine.step():
                delta = processor.process(out.req_id, out.new_token_ids, out.finished)
                tokens[out.req_id].extend(out.new_token_ids)
                logprobs[out.req_id].extend(out.new_logprobs or [])
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.req_id] = out.prompt_logprobs
                texts[out.req_id].append(delta.text)
                if delta.stopped and not out.finished:
                    engine.abort_request(out.req_id)
                if out.finished or delta.stopped:
                    results[out.req_id] = CompletionOutput(
                        req_id=out.req_id,
                        prompt_token_ids=prompt_ids[out.req_id],
                        token_ids=tokens[out.req_id],
                        text="".join(texts[out.req_id]),
                        finish_reason="stop" if delta.stopped else out.finish_reason,
                        num_cached_tokens=out.num_cached_tokens,
                        logprobs=logprobs[out.req_id] if logprobs[out.req_id] else None,
                        prompt_logprobs=prompt_logprobs.get(out.req_id),
                    )
        return [results[r] for r in order]

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel ranks (none with tensor_parallel_size 1)."""
        self.engine.shutdown()
