"""Matrix-vector product for one-row activations: the linear layers of a batch-1 decode step.

A decode step at batch 1 is bound by reading the weights from HBM once. cuBLAS picks split-K
kernels (plus a separate reduce kernel) for Llama-3-8B's o_proj and down_proj at M = 1 and
reaches 0.70-0.93 of the H100's copy rate; this kernel streams each weight row block once with
wide loads and no second pass, and measured faster on every Llama-3-8B shape, all inside a CUDA
graph (H100, bf16, us per call, cuBLAS -> this kernel): qkv 20.7 -> 18.7, o 15.8 -> 13.0,
gate_up 82.2 -> 77.5, down 43.9 -> 40.3, lm_head 373 -> 334 (about 0.45 ms of a 6 ms step).

One program computes BLOCK_N outputs: it walks K in BLOCK_K chunks, multiplies the weight tile
[BLOCK_N, BLOCK_K] by the activation chunk in float32 and reduces once at the end. For the MLP's
merged [gate | up] weight a program takes BLOCK_N gate rows and the matching up rows and writes
silu(gate) * up (`linear_silu_mul`), so a batch-1 layer has no separate activation kernel. The sum order
differs from cuBLAS, so results agree to bf16 rounding, not bit for bit. Only half-precision
one-row inputs on CUDA take this path (float32 stays on cuBLAS, where the exactness tests run);
`linear` falls back to `F.linear` for everything else, and under `TRITON_INTERPRET=1` the tests
run `gemv_triton` on CPU tensors.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from pdserve.engine.model.fused_ops import interpreting, silu_and_mul

try:
    import triton
    import triton.language as tl

    from pdserve.engine.model.fused_ops import silu_mul

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

# PDSERVE_DISABLE_GEMV=1 keeps every linear layer on cuBLAS (to compare, or to rule the kernel out).
_DISABLED = os.environ.get("PDSERVE_DISABLE_GEMV") == "1"
_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_N = 4  # output rows per program: Llama-3-8B's o_proj (4,096 rows) gives 1,024 programs


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [K] the activation row, unit stride
        w_ptr,  # [N, K] weight, row stride stride_wn, unit column stride
        bias_ptr,  # [N] (unused unless HAS_BIAS)
        y_ptr,  # [N] output, or [N_OUT] = [N / 2] with SILU_MUL
        K,
        stride_wn,
        N_OUT,  # outputs: N, or N / 2 with SILU_MUL (the offset of the up rows)
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,  # w = [gate | up]: y = silu(x @ gate^T) * (x @ up^T)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides K (checked on the host): no masks in the loop
        STAGES: tl.constexpr,
        USE_LIBDEVICE: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N if SILU_MUL else 1, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = tl.load(x_ptr + k0 + cols).to(tl.float32)  # [BLOCK_K]
            w = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 + cols)[None, :])  # [BLOCK_N, BLOCK_K]
            acc += w.to(tl.float32) * x[None, :]
            if SILU_MUL:  # the matching up rows, N_OUT rows further down
                w_up = tl.load(w_ptr + (rows + N_OUT)[:, None] * stride_wn + (k0 + cols)[None, :])
                acc_up += w_up.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows).to(tl.float32)
        out_dtype = y_ptr.dtype.element_ty
        if SILU_MUL:
            # Both halves round to the output dtype first, as the GEMV + silu_and_mul pair does.
            gate, up = y.to(out_dtype), tl.sum(acc_up, axis=1).to(out_dtype)
            tl.store(y_ptr + rows, silu_mul(gate, up, USE_LIBDEVICE))
        else:
            tl.store(y_ptr + rows, y.to(out_dtype))


def _config(n: int, k: int) -> tuple[int, int] | None:
    """(BLOCK_K, STAGES) for an [n, k] weight, or None when the kernel cannot take it.

    From a sweep on an H100: 1,024-wide chunks and 3 stages for K <= 8,192; 256-wide chunks and
    4 stages for the long rows of down_proj (K = 14,336); 4 stages for very tall lm_heads.
    """
    if n % BLOCK_N:
        return None
    block_k, stages = (1024, 3) if k <= 8192 else (256, 4)
    if n >= 65536:
        stages = 4
    while block_k > 16 and k % block_k:
        block_k //= 2
    return (block_k, stages) if k % block_k == 0 else None


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul_out: bool = False
) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T (+ bias [N]) -> [1, N] in x's dtype, one launch.

    silu_mul_out: weight is a merged [gate | up] ([2I, K], no bias) and the result is
    silu(gate) * up [1, I], the MLP's activation, without writing [1, 2I] and a second kernel.
    """
    n, k = weight.shape
    config = _config(n, k)
    if (
        config is None
        or x.shape != (1, k)
        or x.stride(-1) != 1
        or weight.stride(-1) != 1
        or (silu_mul_out and (bias is not None or n % (2 * BLOCK_N)))
    ):
        y = F.linear(x, weight, bias)
        return silu_and_mul(y) if silu_mul_out else y
    block_k, stages = config
    n_out = n // 2 if silu_mul_out else n
    y = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    # fmt: off
    _gemv_kernel[(n_out // BLOCK_N,)](
        x, weight, bias if bias is not None else weight, y, k, weight.stride(0), n_out,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul_out, BLOCK_N=BLOCK_N, BLOCK_K=block_k, STAGES=stages,
        USE_LIBDEVICE=not interpreting(), num_warps=4,
    )
    # fmt: on
    return y


def _takes_gemv(x: torch.Tensor, layer: torch.nn.Linear) -> bool:
    return (
        x.shape[0] == 1
        and x.dim() == 2
        and not _DISABLED
        and HAS_TRITON
        and x.is_cuda
        and x.dtype in _DTYPES
        and layer.weight.dtype == x.dtype
    )


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)` for x [T, K]; a one-row half-precision x on CUDA takes the GEMV kernel."""
    if _takes_gemv(x, layer):
        return gemv_triton(x, layer.weight, layer.bias)
    return layer(x)


def linear_silu_mul(x: torch.Tensor, gate_up: torch.nn.Linear) -> torch.Tensor:
    """silu(gate) * up of `gate_up(x)` (rows [gate | up]) -> [T, I]; one launch for a GEMV row."""
    if _takes_gemv(x, gate_up):
        return gemv_triton(x, gate_up.weight, gate_up.bias, silu_mul_out=True)
    return silu_and_mul(gate_up(x))


__all__ = ["gemv_triton", "linear", "linear_silu_mul"]
