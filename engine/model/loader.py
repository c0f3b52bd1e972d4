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
from pdserve.engine.model.sharding import ShardLayout
from pdserve.engine.model.tp_group import TPGroup

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
    shard: ShardLayout | None = None,
    tp: TPGroup | None = None,
) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and load (or randomly draw) its weights;
    with `shard`, one tensor-parallel rank's part of them (sliced as it loads)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    files = None
    if config.name != TINY_PRESET and load_format == "auto":
        files = _safetensors_files(config.path)  # fail fast, before allocating
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, backend, shard, tp)
    finally:
        torch.set_default_dtype(old_dtype)
    # RoPE frequencies stay float32 whatever the model dtype (as in transformers).
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()
    if files is None and model.shard.size > 1:
        _random_init_sharded(model, TINY_SEED, device)
    elif files is None:
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


def _merged_slices(shard: ShardLayout) -> dict[str, list[int]]:
    """Row sizes of each merged parameter's slices (this rank's), by merged name part."""
    q = shard.num_heads * shard.head_dim
    kv = shard.num_kv_heads * shard.head_dim
    return {".qkv_proj.": [q, kv, kv], ".gate_up_proj.": [shard.intermediate_size] * 2}


def _split_merged(name: str, tensor: torch.Tensor, sizes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """One parameter under its Hugging Face name(s): a merged projection split back."""
    merged = next((m for m in sizes if m in name), None)
    if merged is None:
        return {name: tensor}
    parts = tensor.split(sizes[merged], dim=0)
    return {
        name.replace(merged, ckpt_part): parts[idx] for ckpt_part, (m, idx) in _MERGED.items() if m == merged
    }


def checkpoint_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (merged projections split back)."""
    sizes = _merged_slices(model.shard)
    out = {}
    for name, tensor in model.state_dict().items():
        out.update(_split_merged(name, tensor, sizes))
    return out


def _destination(model: LlamaForCausalLM, params: dict, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(parameter, the view of it) a checkpoint tensor fills on this rank; None: not a weight."""
    sizes = _merged_slices(model.shard)
    target, rows = key, None
    for part, (merged, idx) in _MERGED.items():
        if part in key:  # a slice of a merged projection
            target = key.replace(part, merged)
            start = sum(sizes[merged][:idx])
            rows = slice(start, start + sizes[merged][idx])
    param = params.get(target)
    if param is None:
        return None  # e.g. rotary inv_freq saved by old checkpoints
    dest = param if rows is None else param[rows]
    cut = model.shard.checkpoint_slice(key)
    if cut is not None and ("embed_tokens." in key or key.startswith("lm_head.")):
        dest = dest[: cut[2] - cut[1]]  # the last rank's vocabulary rows end in padding
    return param, dest


def _take_shard(model: LlamaForCausalLM, key: str, tensor) -> torch.Tensor:
    """This rank's part of a whole checkpoint tensor (a torch tensor or a safetensors slice)."""
    cut = model.shard.checkpoint_slice(key)
    if cut is None:
        return tensor[:] if not isinstance(tensor, torch.Tensor) else tensor
    dim, start, stop = cut
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def _random_init_sharded(model: LlamaForCausalLM, seed: int, device: str) -> None:
    """This rank's part of exactly the weights `_random_init` draws for the whole model."""
    with torch.device("meta"):
        full = LlamaForCausalLM(model.config, None)
    full_sizes = _merged_slices(full.shard)
    params = dict(model.named_parameters())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, meta in full.named_parameters():
            if name.endswith("norm.weight"):
                tensor = torch.ones(meta.shape)
            elif meta.dim() == 1:
                tensor = torch.randn(meta.shape, generator=gen) * 0.02
            else:
                std = 1.0 if "embed_tokens" in name else meta.shape[1] ** -0.5
                if torch.device(device).type == "cpu":
                    tensor = torch.randn(meta.shape, generator=gen) * std
                else:
                    g = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
                    dtype = params[name].dtype
                    tensor = torch.empty(meta.shape, dtype=dtype, device=device).normal_(
                        0.0, std, generator=g
                    )
            for key, part in _split_merged(name, tensor, full_sizes).items():
                param, dest = _destination(model, params, key)
                dest.copy_(_take_shard(model, key, part).to(device=device, dtype=param.dtype))


def _load_safetensors(model: LlamaForCausalLM, files: list[str], device: str) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    needed = set(checkpoint_tensors(model))  # every checkpoint tensor the model needs
    loaded: set[str] = set()
    with torch.no_grad():
        for fn in files:
            with safe_open(fn, framework="pt", device="cpu") as f:
                for key in f.keys():
                    found = _destination(model, params, key)
                    if found is None:
                        continue
                    param, dest = found
                    # Only this rank's rows / columns are read (whole tensors without TP).
                    tensor = (
                        _take_shard(model, key, f.get_slice(key))
                        if model.shard.size > 1
                        else f.get_tensor(key)
                    )
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
