"""pdserve's inference engine: one engine, two roles (prefill, decode), or co-located."""

from engine.core.sampling_params import SamplingParams
from engine.llm import LLM, CompletionOutput
from engine.llm_engine import EngineConfig, LLMEngine

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "SamplingParams"]
