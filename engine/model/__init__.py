from engine.model.llama import LlamaForCausalLM
from engine.model.loader import load_model

__all__ = ["LlamaForCausalLM", "load_model"]
