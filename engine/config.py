"""Model and engine configuration.

`ModelConfig` reads a Hugging Face `config.json` (transformers 4.x `rope_theta` +
`rope_scaling`, or 5.x `rope_parameters`) for the Llama family: Llama 2/3,
Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm, explicit head_dim).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

TINY_PRESET = "tiny"
# generation_config.json key -> SamplingParams field, for the defaults the engine honours.
GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
DTYPES = ("float32", "bfloat16", "float16")  # the names `model_runner.parse_dtype` takes


@dataclass
class EngineConfig:
    """What every engine of a deployment shares (the role is the engine's constructor argument)."""

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    enable_prefix_caching: bool = True
    # The prefix cache's host-memory tier: evicted full blocks are kept in (pinned) host
    # memory and copied back on a hit. host_cache_gb sizes it; num_host_blocks, when set,
    # gives the slot count directly (tests). 0 / None: no tier.
    host_cache_gb: float = 0.0
    num_host_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    attention_backend: str = "auto"
    load_format: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode
    async_scheduling: bool = True  # overlap host work with the GPU (not in the prefill role)
    # Record BlockStored/BlockRemoved for the router's cache index; off where nothing drains
    # them (the offline LLM), or the list grows with every block ever cached.
    kv_events: bool = True
    # Ranks one worker spreads the model over (Megatron-style tensor parallelism; gloo on CPU,
    # NCCL on CUDA). 1: the single-process path, unchanged.
    tensor_parallel_size: int = 1
    # For testing tensor parallelism on ONE GPU: every rank on the configured device, their
    # collectives over gloo through host memory (slow; CUDA graphs cannot capture them, so
    # it needs enforce_eager). Off: rank r takes the r-th GPU from the configured one, NCCL.
    # No effect with tensor_parallel_size 1.
    tensor_parallel_shared_device: bool = False

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if not isinstance(self.host_cache_gb, (int, float)) or not 0 <= self.host_cache_gb < float("inf"):
            raise ValueError(f"host_cache_gb must be a finite number >= 0, got {self.host_cache_gb!r}")
        if self.num_host_blocks is not None and self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
        if (self.host_cache_gb or self.num_host_blocks) and not self.enable_prefix_caching:
            raise ValueError(
                "a host cache tier (host_cache_gb / num_host_blocks) needs enable_prefix_caching"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self._validate_tensor_parallel()

    def _validate_tensor_parallel(self) -> None:
        """Refuse what tensor parallelism does not support yet, naming the key."""
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if tp == 1:
            return
        if self.host_cache_gb or self.num_host_blocks:
            raise ValueError(
                f"tensor_parallel_size = {tp} does not support the prefix cache's host tier yet: "
                "set host_cache_gb: 0 and num_host_blocks unset"
            )
        if self.tensor_parallel_shared_device:
            if not str(self.device).startswith("cuda"):
                raise ValueError(
                    "tensor_parallel_shared_device puts every rank on one CUDA device (for testing); "
                    f"device is {self.device!r}, whose ranks share the host already: leave it false"
                )
            if not self.enforce_eager:
                raise ValueError(
                    f"tensor_parallel_size = {tp} with tensor_parallel_shared_device: CUDA graphs cannot "
                    "capture its gloo collectives; set enforce_eager: true"
                )


@dataclass
class ModelConfig:
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    sliding_window: int | None = None
    path: str | None = None  # local HF directory, None for presets
    # generation_config.json's sampling defaults, by SamplingParams field name: what a request
    # that leaves a field unset gets (vLLM's `--generation-config auto`).
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str, path: str | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"model {name!r}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope = cfg.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling") or (rope if rope else None)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ValueError(f"model {name!r}: unsupported rope_scaling type {rope_type!r}")
            rope_scaling = None if rope_type == "default" else dict(rope_scaling, rope_type=rope_type)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        use_sw = cfg.get("use_sliding_window", family == "mistral")
        return cls(
            name=name,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=cfg.get("sliding_window") if use_sw else None,
            path=path,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ValueError(
                f"model path {path!r} does not exist (give a local Hugging Face directory or 'tiny')"
            )
        if not os.path.isfile(cfg_path):
            raise ValueError(f"model path {path!r} has no config.json")
        with open(cfg_path) as f:
            config = cls.from_hf_dict(json.load(f), name=os.path.basename(os.path.normpath(path)), path=path)
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                config.apply_generation_config(json.load(f))
        return config

    def apply_generation_config(self, gen: dict[str, Any]) -> None:
        """Take generation_config.json's eos ids (added to config.json's: every one stops a
        request) and the sampling defaults the engine supports."""
        eos = gen.get("eos_token_id")
        for tok in [] if eos is None else ([eos] if isinstance(eos, int) else eos):
            if tok not in self.eos_token_ids:
                self.eos_token_ids.append(tok)
        for hf_key, field_name in GENERATION_DEFAULT_KEYS.items():
            if gen.get(hf_key) is not None:
                self.generation_defaults[field_name] = gen[hf_key]

    @classmethod
    def tiny(cls) -> ModelConfig:
        """The built-in preset: a 2-layer Llama over a byte-level vocabulary (258 ids:
        bytes 0-255, then <bos>=256, <eos>=257), random weights from a fixed seed."""
        return cls(
            name=TINY_PRESET,
            architecture="LlamaForCausalLM",
            vocab_size=258,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            eos_token_ids=[257],
            bos_token_id=256,
        )

    @classmethod
    def resolve(cls, model: str) -> ModelConfig:
        return cls.tiny() if model == TINY_PRESET else cls.from_pretrained(model)
