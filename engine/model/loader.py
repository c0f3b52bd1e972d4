"""Build a model and fill its weights: from safetensors files, or random ("dummy").

Checkpoint tensor names match the module names, so loading is a name lookup per
tensor. Sharded checkpoints list their files in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import zlib

import torch

from pdserve.engine.config import TINY_PRESET, ModelConfig
from pdserve.engine.model.llama import LlamaForCausalLM

TINY_SEED = 0


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(path, fn))]
        if missing:
            raise ValueError(
                f"model path {path!r}: shard(s) listed in the index are missing: {', '.join(missing)}"
            )
        return [os.path.join(path, fn) for fn in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if found:
        return [os.path.join(path, fn) for fn in found]
    raise ValueError(f"model path {path!r} has no *.safetensors weights (and load_format is not 'dummy')")


def _random_init(model: LlamaForCausalLM, seed: int) -> None:
    """Deterministic random weights: normal(0, 0.02)-style as HF's initializer, norms at 1."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dim() == 1:  # biases
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            else:
                std = 1.0 if "embed_tokens" in name else param.shape[1] ** -0.5
                if param.device.type == "cpu":
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
                else:  # large models: draw on the device, seeded, to keep start-up fast
                    g = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
                    param.normal_(0.0, std, generator=g)


def load_model(
    config: ModelConfig,
    backend,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    load_format: str = "auto",
) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and load (or randomly draw) its weights."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    files = None
    if config.name != TINY_PRESET and load_format == "auto":
        files = _safetensors_files(config.path)  # fail fast, before allocating
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, backend)
    finally:
        torch.set_default_dtype(old_dtype)
    # RoPE frequencies stay float32 whatever the model dtype (as in transformers).
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()
    if files is None:
        _random_init(model, TINY_SEED)
    else:
        _load_safetensors(model, files, device)
    return model.eval()


# Checkpoint projections that live as row slices of one merged parameter here:
# checkpoint name part -> (merged name part, index of the slice in the merged rows).
_MERGED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def _merged_slices(config: ModelConfig) -> dict[str, list[int]]:
    """Row sizes of each merged parameter's slices, by merged name part."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {".qkv_proj.": [q, kv, kv], ".gate_up_proj.": [config.intermediate_size] * 2}


def checkpoint_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (merged projections split back)."""
    sizes = _merged_slices(model.config)
    out = {}
    for name, tensor in model.state_dict().items():
        merged = next((m for m in sizes if m in name), None)
        if merged is None:
            out[name] = tensor
            continue
        parts = tensor.split(sizes[merged], dim=0)
        for ckpt_part, (m, idx) in _MERGED.items():
            if m == merged:
                out[name.replace(merged, ckpt_part)] = parts[idx]
    return out


def _load_safetensors(model: LlamaForCausalLM, files: list[str], device: str) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    sizes = _merged_slices(model.config)
    needed = set(checkpoint_tensors(model))  # every checkpoint tensor the model needs
    loaded: set[str] = set()
    with torch.no_grad():
        for fn in files:
            with safe_open(fn, framework="pt", device="cpu") as f:
                for key in f.keys():
                    target, rows = key, None
                    for part, (merged, idx) in _MERGED.items():
                        if part in key:  # a slice of a merged projection
                            target = key.replace(part, merged)
                            start = sum(sizes[merged][:idx])
                            rows = slice(start, start + sizes[merged][idx])
                    param = params.get(target)
                    if param is None:
                        continue  # e.g. rotary inv_freq saved by old checkpoints
                    dest = param if rows is None else param[rows]
                    tensor = f.get_tensor(key)
                    if tensor.shape != dest.shape:
                        raise ValueError(
                            f"{fn}: tensor {key} has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(dest.shape)}"
                        )
                    dest.copy_(tensor.to(device=device, dtype=param.dtype))
                    loaded.add(key)
    missing = sorted(needed - loaded)
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
