from pdserve.engine.model.llama import LlamaForCausalLM
from pdserve.engine.model.loader import load_model

__all__ = ["LlamaForCausalLM", "load_model"]
