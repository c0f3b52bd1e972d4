"""pdserve's inference engine: one engine, two roles (prefill, decode), or co-located.

Imports are lazy so that `engine.core` (pure Python) can be used by the router and
the policy simulator without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.engine.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm import LLM, CompletionOutput
    from pdserve.engine.llm_engine import LLMEngine

_LAZY = {
    "LLM": "pdserve.engine.llm",
    "CompletionOutput": "pdserve.engine.llm",
    "EngineConfig": "pdserve.engine.config",
    "LLMEngine": "pdserve.engine.llm_engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdserve.engine' has no attribute {name!r}")


__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "SamplingParams"]
