"""The floors of bench.gpu: what one Llama step must move and compute (`ModelCost`, from
config.json) and the rates this GPU reaches in the same run (`measure_limits`)."""

from __future__ import annotations

import torch

from pdserve.bench.transfer import best_seconds


class ModelCost:
    """Bytes and FLOPs of one Llama step, computed from config.json (for the floors)."""

    def __init__(self, cfg: dict, dtype: torch.dtype) -> None:
        hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
        self.num_layers, self.num_q_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.head_dim = head_dim
        kv_heads = cfg["num_key_value_heads"]
        self.elem = torch.empty((), dtype=dtype).element_size()
        attention = hidden * head_dim * (2 * self.num_q_heads + 2 * kv_heads)  # q, o; k, v
        self.layer_params = self.num_layers * (attention + 3 * hidden * inter + 2 * hidden)
        self.lm_head_params = cfg["vocab_size"] * hidden
        self.kv_bytes_per_token = self.num_layers * 2 * kv_heads * head_dim * self.elem

    def decode_step_bytes(self, context_tokens: int) -> int:
        """HBM bytes one decode step must read: every weight once (the embedding table
        is only gathered, one row per token, so it is left out) and every context
        token's K and V, summed over the batch."""
        return (
            self.layer_params + self.lm_head_params
        ) * self.elem + context_tokens * self.kv_bytes_per_token

    def prefill_flops(self, tokens: int) -> float:
        """2 x params x tokens through the layers, the lm_head for the last token only
        (both engines compute only its logits), plus causal attention (QK^T and PV)."""
        attention = 4.0 * tokens * (tokens + 1) / 2 * self.head_dim * self.num_q_heads * self.num_layers
        return 2.0 * self.layer_params * tokens + 2.0 * self.lm_head_params + attention

    def offline_floor_s(self, prompt_len: int, output_len: int, limits: dict) -> float:
        """Least time one request of an offline batch can cost: its matmul FLOPs at the matmul
        rate (every prompt and fed-back token through the layers, an lm_head per sampled token,
        causal attention) plus its decode steps' K/V reads at the copy rate. Weights are shared
        by the whole batch, so they are left out; the two terms add because GEMMs and attention
        run as separate kernels."""
        fed = prompt_len + output_len - 1  # the last sampled token is never fed back
        flops = self.prefill_flops(prompt_len) - 2.0 * self.lm_head_params  # counted below
        flops += 2.0 * self.layer_params * (output_len - 1) + 2.0 * self.lm_head_params * output_len
        kv_tokens_read = sum(range(prompt_len + 1, fed + 1))  # decode step at context c reads c tokens
        flops += 4.0 * self.head_dim * self.num_q_heads * self.num_layers * kv_tokens_read
        return flops / (limits["matmul_tflops"] * 1e12) + kv_tokens_read * self.kv_bytes_per_token / (
            limits["copy_gbps"] * 1e9
        )


def measure_limits(
    device: torch.device, dtype: torch.dtype, cfg: dict | None = None, rows: int = 8192
) -> dict[str, float]:
    """The GPU's copy and matmul rates, measured in this run (bench.attention_kernels'
    functions on CUDA; small best-of-5 stand-ins on CPU). On CUDA with the model's `cfg`, also
    the rate of its decoder layer's GEMMs at `rows` tokens (a prefill step's size)."""
    if device.type == "cuda":
        from pdserve.bench.attention_kernels import (
            measure_copy_gbps,
            measure_layer_gemm_tflops,
            measure_matmul_tflops,
        )

        limits = {"copy_gbps": measure_copy_gbps(), "matmul_tflops": measure_matmul_tflops()}
        if cfg is not None:
            qkv_out = cfg["head_dim"] * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
            limits["layer_gemm_tflops"] = measure_layer_gemm_tflops(
                cfg["hidden_size"], cfg["intermediate_size"], qkv_out, rows
            )
        torch.cuda.empty_cache()  # hand the 4 GiB back before the engine sizes its cache
        return limits
    src = torch.empty(8 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), 5, device)
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    matmul_s = best_seconds(lambda: a @ b, 5, device)
    return {"copy_gbps": 2 * src.nbytes / copy_s / 1e9, "matmul_tflops": 2 * 512**3 / matmul_s / 1e12}
