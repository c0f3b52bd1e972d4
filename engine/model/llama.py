"""Llama-family decoder over the paged KV cache.

One class covers Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias) and
Qwen3 (per-head q/k RMSNorm). Parameter names match Hugging Face checkpoints, so
a safetensors state dict loads without renaming. The forward pass takes the
step's new tokens packed into one flat batch of T tokens (no padding); attention
reads and writes the paged cache through `AttentionMetadata`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.config import ModelConfig
from pdserve.engine.model.fused_ops import fused_add_rms_norm, rms_norm, rotary_embedding_and_store_kv_
from pdserve.engine.model.gemv import linear, linear_silu_mul
from pdserve.engine.model.sharding import ShardLayout
from pdserve.engine.model.tp_group import TPGroup


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers: normalise in float32, cast, then scale
        # (one Triton kernel on CUDA, plain torch elsewhere; see fused_ops).
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, with llama3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Holds the RoPE inverse frequencies (float32); `fused_ops.rotary_embedding_` applies them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)


class Attention(nn.Module):
    """Under tensor parallelism: this rank's heads (column-parallel qkv, row-parallel o_proj)."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, backend, shard: ShardLayout, tp: TPGroup | None
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v projections as one GEMM: rows [q | k | v] (the loader fills the slices).
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        inv_freq: torch.Tensor,  # [head_dim // 2] float32
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = hidden.shape[0]
        qkv = linear(hidden, self.qkv_proj)  # [T, q_size + 2 * kv_size]
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE in place (q, k may be views of qkv), and the rotated k with v into the paged cache:
        # one launch on CUDA.
        layer_cache = kv_cache[self.layer_idx]
        q, k = rotary_embedding_and_store_kv_(q, k, v, positions, inv_freq, layer_cache, meta.slot_mapping)
        out = self.backend.forward(q, k, v, layer_cache, meta, self.scale, kv_stored=True)
        out = linear(out.reshape(T, self.num_heads * self.head_dim), self.o_proj)
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    """Under tensor parallelism: this rank's intermediate slice (column-parallel gate_up,
    row-parallel down_proj)."""

    def __init__(self, config: ModelConfig, shard: ShardLayout, tp: TPGroup | None) -> None:
        super().__init__()
        self.tp = tp
        self.intermediate_size = shard.intermediate_size
        # gate and up projections as one GEMM: rows [gate | up].
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up of the merged [gate | up] GEMM: [T, intermediate]. A one-row step does it
        # in the GEMV's epilogue; otherwise GEMM, then one Triton pass on CUDA (fused_ops).
        out = linear(linear_silu_mul(x, self.gate_up_proj), self.down_proj)
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, backend, shard: ShardLayout, tp: TPGroup | None
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, backend, shard, tp)
        self.mlp = MLP(config, shard, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, residual, positions, inv_freq, kv_cache, meta):
        """Carries the residual stream separately so each norm fuses with the add before it."""
        norm = self.input_layernorm
        if residual is None:  # first layer
            residual, hidden = hidden, rms_norm(hidden, norm.weight, norm.eps)
        else:
            hidden, residual = fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)
        hidden = self.self_attn(hidden, positions, inv_freq, kv_cache, meta)
        norm = self.post_attention_layernorm
        hidden, residual = fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend, shard: ShardLayout, tp: TPGroup | None) -> None:
        super().__init__()
        # Vocabulary-parallel under TP: rows [vocab_start, vocab_end) of the table, zero padding after.
        self.embed_tokens = nn.Embedding(shard.vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, shard, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """The whole model, or (`shard`, `tp`) one tensor-parallel rank's part of it."""

    def __init__(
        self, config: ModelConfig, backend, shard: ShardLayout | None = None, tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.shard = shard or ShardLayout.for_rank(config)
        self.tp = tp
        self.model = LlamaModel(config, backend, self.shard, tp)
        self.lm_head = nn.Linear(config.hidden_size, self.shard.vocab_rows, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        hidden = self.model.embed_tokens(input_ids) if self.tp is None else self._embed_parallel(input_ids)
        residual = None
        inv_freq = self.model.rotary_emb.inv_freq
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, positions, inv_freq, kv_cache, meta)
        norm = self.model.norm
        hidden, _ = fused_add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return hidden

    def _embed_parallel(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each rank looks up the ids in its vocabulary rows (zeros for the others'); the sum
        over ranks is the embedding."""
        shard = self.shard
        outside = (input_ids < shard.vocab_start) | (input_ids >= shard.vocab_end)
        local = (input_ids - shard.vocab_start).masked_fill_(outside, 0)
        hidden = self.model.embed_tokens(local).masked_fill_(outside.unsqueeze(1), 0.0)
        return self.tp.all_reduce(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, hidden] -> [N, vocab] in float32 for the sampler
        logits = linear(hidden, self.lm_head).float()
        if self.tp is None:
            return logits
        # Every rank's vocabulary columns, on every rank (rank 0 samples; the others follow it).
        return self.tp.all_gather_columns(logits)[:, : self.config.vocab_size]
