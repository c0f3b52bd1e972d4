"""Fused elementwise kernels for the decoder layer: residual add + RMSNorm, in-place RoPE (with the
K/V cache write), SiLU·mul.

At small batch a decode step is bound by kernel launches, not bandwidth: the torch RMSNorm is ~7
elementwise kernels, RoPE ~8 more for q and k, and the residual add one more. Each op here is one
Triton launch (one program per row / per token-head) whose arithmetic follows the torch modules in
`engine/model/llama.py` op for op, with the same intermediate roundings, so bf16 results agree with
them bit for bit or within 1 ulp (float32 reductions may sum in a different order).

At prefill sizes the MLP's `F.silu(gate) * up` on the two strided halves of the merged gate/up GEMM
output is bandwidth-bound, and torch runs it as two non-vectorized kernels (an intermediate [T, I]
written and read back); `silu_and_mul` is one pass reading each row's two halves contiguously.

Every public op has a pure-torch fallback with the same signature (`*_torch`) and a Triton version
(`*_triton`); the plain names dispatch on `available(device)`, which is true only for CUDA tensors
with Triton installed. The Triton versions also run on CPU tensors under `TRITON_INTERPRET=1`, which
is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from pdserve.engine.attention.metadata import write_kv

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

# One program holds a whole row in registers; beyond this the torch path is used.
MAX_FUSED_HIDDEN = 32768


# PDSERVE_DISABLE_FUSED_OPS=1 forces the torch paths (to compare, or to rule the kernels out).
_DISABLED = os.environ.get("PDSERVE_DISABLE_FUSED_OPS") == "1"


# The engine's dtypes; float16 stays on the torch path (its test on an H100 did not match
# torch to the bit, and nothing in pdserve runs float16).
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def available(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """True when the Triton kernels can run for tensors on `device` (a CUDA device, Triton present)."""
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        return False
    return HAS_TRITON and not _DISABLED and torch.device(device).type == "cuda"


def interpreting() -> bool:
    """Under Triton's CPU interpreter (libdevice is unavailable there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------
# Pure-torch reference paths (same op order as llama.py's RMSNorm / RotaryEmbedding / apply_rope).
# --------------------------------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [..., H], weight [H]: normalise in float32, cast to x's dtype, then scale (as transformers).
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual [..., H] -> (rms_norm(x + residual) [..., H], x + residual [..., H])
    new_residual = x + residual
    return rms_norm_torch(new_residual, weight, eps), new_residual


def rotary_embedding_torch_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q [T, Hq, D], k [T, Hkv, D], positions [T], inv_freq [D // 2] float32; rotates q and k in place.
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, D // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]  # [T, 1, D]
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rotated * sin)
    return q, k


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up [..., 2I] = [gate | up] -> silu(gate) * up [..., I], as llama.py's MLP has always done.
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


# --------------------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,  # [T, H], row stride x_stride, unit column stride
        res_ptr,  # [T, H] residual (unused unless HAS_RESIDUAL)
        w_ptr,  # [H] contiguous
        out_ptr,  # [T, H] normed output
        res_out_ptr,  # [T, H] x + residual (unused unless HAS_RESIDUAL)
        x_stride,
        res_stride,
        out_stride,
        res_out_stride,
        H,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64 so row * stride cannot overflow
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            # torch adds half types in float32 and rounds once; the sum of two floats is the same.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=0) / H  # masked lanes are 0 and add nothing
        normed = (x32 * tl.rsqrt(variance + eps)).to(x.dtype)  # round to the input dtype first...
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)  # ...then scale, rounding once to out's dtype
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_head(ptr, offs, mask, HALF, cos, sin):
        # ptr -> one head's [D] vector (unit stride); cos/sin [BLOCK_HALF] float32. Mirrors
        # x * cos + cat(-x2, x1) * sin in x's dtype: each product and the sum rounds to x's dtype.
        x1 = tl.load(ptr + offs, mask=mask, other=0.0)
        x2 = tl.load(ptr + HALF + offs, mask=mask, other=0.0)
        dt = x1.dtype
        c = cos.to(dt).to(tl.float32)
        s = sin.to(dt).to(tl.float32)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        o1 = (x1f * c).to(dt).to(tl.float32) + ((-x2f) * s).to(dt).to(tl.float32)
        o2 = (x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)
        o1, o2 = o1.to(dt), o2.to(dt)
        tl.store(ptr + offs, o1, mask=mask)
        tl.store(ptr + HALF + offs, o2, mask=mask)
        return o1, o2

    @triton.jit
    def _rope_kernel(
        q_ptr,  # [T, Hq, D] strides (q_stride_t, q_stride_h, 1)
        k_ptr,  # [T, Hkv, D] strides (k_stride_t, k_stride_h, 1)
        pos_ptr,  # [T] integer positions
        inv_freq_ptr,  # [D // 2] float32
        q_stride_t,
        q_stride_h,
        k_stride_t,
        k_stride_h,
        num_q_heads,
        num_heads,  # Hq + Hkv
        HALF,
        v_ptr,  # [T, Hkv, D] strides (v_stride_t, v_stride_h, 1); the rest unused unless STORE_KV
        v_stride_t,
        v_stride_h,
        key_cache_ptr,  # [num_slots, Hkv, D] (strides cache_stride_slot, cache_stride_head, 1)
        value_cache_ptr,
        slot_ptr,  # [T] cache slot of each token; < 0: not stored (padding rows of a CUDA graph)
        cache_stride_slot,
        cache_stride_head,
        BLOCK_HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        USE_LIBDEVICE: tl.constexpr,
        STORE_KV: tl.constexpr,
    ):
        # grid (T, cdiv(Hq + Hkv, BLOCK_H)): one program per (token, tile of BLOCK_H heads) of the
        # concatenated [q heads | k heads]; cos/sin are computed once per tile, not once per head
        # (the full-range sin/cos are most of the work at prefill sizes).
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        offs = tl.arange(0, BLOCK_HALF)
        mask = offs < HALF
        pos = tl.load(pos_ptr + t).to(tl.float32)
        freqs = pos * tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)  # [BLOCK_HALF] float32
        if USE_LIBDEVICE:
            # Full-range-reduced cosf/sinf, the same CUDA math functions torch's cos/sin call.
            cos = libdevice.cos(freqs)
            sin = libdevice.sin(freqs)
        else:
            cos = tl.cos(freqs)
            sin = tl.sin(freqs)
        cos, sin, offs2 = cos[None, :], sin[None, :], offs[None, :]
        is_q = heads < num_q_heads
        q_heads = tl.where(is_q, heads, 0).to(tl.int64)[:, None]
        k_heads = tl.where(is_q, 0, heads - num_q_heads).to(tl.int64)[:, None]
        q_mask = is_q[:, None] & mask[None, :]
        k_mask = (~is_q & (heads < num_heads))[:, None] & mask[None, :]
        _rotate_head(q_ptr + t * q_stride_t + q_heads * q_stride_h, offs2, q_mask, HALF, cos, sin)
        k1, k2 = _rotate_head(k_ptr + t * k_stride_t + k_heads * k_stride_h, offs2, k_mask, HALF, cos, sin)
        if STORE_KV:
            # The rotated k and this token's v go straight into the paged cache: no store kernel.
            slot = tl.load(slot_ptr + t).to(tl.int64)
            kv_mask = k_mask & (slot >= 0)
            dst = slot * cache_stride_slot + k_heads * cache_stride_head + offs2  # [BLOCK_H, BLOCK_HALF]
            cache_dt = key_cache_ptr.dtype.element_ty
            tl.store(key_cache_ptr + dst, k1.to(cache_dt), mask=kv_mask)
            tl.store(key_cache_ptr + dst + HALF, k2.to(cache_dt), mask=kv_mask)
            v_row = v_ptr + t * v_stride_t + k_heads * v_stride_h + offs2
            v1 = tl.load(v_row, mask=kv_mask, other=0.0)
            v2 = tl.load(v_row + HALF, mask=kv_mask, other=0.0)
            tl.store(value_cache_ptr + dst, v1.to(cache_dt), mask=kv_mask)
            tl.store(value_cache_ptr + dst + HALF, v2.to(cache_dt), mask=kv_mask)

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,  # [T, 2I] = [gate | up], row stride x_stride, unit column stride
        out_ptr,  # [T, I] contiguous
        x_stride,
        out_stride,
        INTER,
        BLOCK: tl.constexpr,
        USE_LIBDEVICE: tl.constexpr,
    ):
        # grid (T, cdiv(I, BLOCK)): one program per (row, BLOCK-wide column chunk) of both halves.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INTER
        row_ptr = x_ptr + row * x_stride
        gate = tl.load(row_ptr + cols, mask=mask, other=0.0)
        up = tl.load(row_ptr + INTER + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * out_stride + cols, silu_mul(gate, up, USE_LIBDEVICE), mask=mask)

    @triton.jit
    def silu_mul(gate, up, USE_LIBDEVICE: tl.constexpr):
        """silu(gate) * up for tiles of one dtype, rounded as torch rounds; also the GEMV's epilogue."""
        dt = up.dtype
        g = gate.to(tl.float32)
        # torch's silu (CUDA and CPU): upcast to float, x / (1 + exp(-x)), round to the input dtype.
        # libdevice's expf is the function torch's CUDA kernel calls, and div_rn is IEEE division
        # (Triton's plain `/` on float32 is the approximate div.full).
        if USE_LIBDEVICE:
            e = libdevice.exp(-g)
        else:
            e = tl.exp(-g)
        silu = tl.math.div_rn(g, 1.0 + e).to(dt)
        # torch multiplies in float and rounds once; the product of two bf16 values is exact in float.
        return (silu.to(tl.float32) * up.to(tl.float32)).to(dt)


def _num_warps(block: int) -> int:
    # 1 warp up to 256 columns, then one more warp per 256 columns, at most 16 (16384: 32 per thread).
    return max(1, min(16, block // 256))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    # [..., H] -> [T, H] with unit column stride (a view when possible).
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    H = x.shape[-1]
    x2d = _as_rows(x)  # [T, H]
    r2d = _as_rows(residual) if residual is not None else x2d  # [T, H]
    w = weight.contiguous()  # [H]
    out = torch.empty(x2d.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x2d, memory_format=torch.contiguous_format) if residual is not None else out
    T = x2d.shape[0]
    if T > 0:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(T,)](
            x2d,
            r2d,
            w,
            out,
            res_out,
            x2d.stride(0),
            r2d.stride(0),
            out.stride(0),
            res_out.stride(0),
            H,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    out = out.view(*x.shape[:-1], H)
    return out, (res_out.view(*x.shape[:-1], H) if residual is not None else None)


def _norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        HAS_TRITON
        and x.is_floating_point()
        and weight.is_floating_point()
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
        and 0 < x.shape[-1] <= MAX_FUSED_HIDDEN
        and weight.device == x.device
    )


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] by weight [H] in one launch; falls back to torch for unsupported input."""
    if not _norm_supported(x, weight):
        return rms_norm_torch(x, weight, eps)
    return _rms_norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [..., H] in one launch."""
    if not _norm_supported(x, weight) or residual.shape != x.shape or residual.dtype != x.dtype:
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    normed, new_residual = _rms_norm_launch(x, residual, weight, eps)
    assert new_residual is not None
    return normed, new_residual


def rotary_embedding_triton_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_cache_layer: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (one launch for both); returns (q, k).

    With v [T, Hkv, D], kv_cache_layer [2, num_blocks, block_size, Hkv, D] and slot_mapping [T],
    the same launch also writes the rotated k and v into the cache (slot < 0 skipped).
    """
    T, num_q_heads, D = q.shape
    store = kv_cache_layer is not None
    supported = (
        HAS_TRITON
        and k.dim() == 3
        and k.shape[0] == T
        and k.shape[2] == D
        and D % 2 == 0
        and k.dtype == q.dtype
        and q.stride(2) == 1
        and k.stride(2) == 1
        and inv_freq.numel() == D // 2
        and positions.numel() == T
        and not positions.is_floating_point()
        and (not store or (v.shape == k.shape and v.stride(2) == 1 and kv_cache_layer.is_contiguous()))
    )
    if not supported:
        rotary_embedding_torch_(q, k, positions, inv_freq)
        if store:
            write_kv(k, v, kv_cache_layer, slot_mapping)
        return q, k
    if T == 0:
        return q, k
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()  # [D // 2]
    positions = positions.reshape(-1).contiguous()  # [T]
    block_half = triton.next_power_of_2(D // 2)
    num_heads = num_q_heads + k.shape[1]
    block_h = min(ROPE_HEADS_PER_PROGRAM, triton.next_power_of_2(num_heads))
    if store:
        key_cache, value_cache = kv_cache_layer[0], kv_cache_layer[1]  # [blocks, block_size, Hkv, D]
        cache_args = (v, v.stride(0), v.stride(1), key_cache, value_cache, slot_mapping, key_cache.stride(1),
                      key_cache.stride(2))  # fmt: skip
    else:
        cache_args = (k, 0, 0, k, k, positions, 0, 0)  # placeholders, never read
    _rope_kernel[(T, triton.cdiv(num_heads, block_h))](
        q,
        k,
        positions,
        inv_freq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q_heads,
        num_heads,
        D // 2,
        *cache_args,
        BLOCK_HALF=block_half,
        BLOCK_H=block_h,
        USE_LIBDEVICE=not interpreting(),
        STORE_KV=store,
        num_warps=2 if block_h * block_half <= 512 else 4,
    )
    return q, k


# Heads per RoPE program: 8 heads of 128 share one sin/cos evaluation and give 2 KiB tiles; a
# decode step (T = 1) still spreads Llama-3-8B's 40 q/k heads over 5 programs.
ROPE_HEADS_PER_PROGRAM = 8

# Columns per silu_and_mul program: wide enough for 16-byte vector loads on every thread and few
# programs per row (Llama-3-8B's I = 14336 is 7 chunks), small enough to keep registers low.
SILU_BLOCK = 2048


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up] in one launch -> [..., I]."""
    width = gate_up.shape[-1]
    supported = HAS_TRITON and gate_up.dtype in _KERNEL_DTYPES and width % 2 == 0 and width > 0
    if not supported:
        return silu_and_mul_torch(gate_up)
    inter = width // 2
    x2d = _as_rows(gate_up)  # [T, 2I]
    T = x2d.shape[0]
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
    if T > 0:
        block = min(SILU_BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            x2d,
            out,
            x2d.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            USE_LIBDEVICE=not interpreting(),
            num_warps=_num_warps(block),
        )
    return out.view(*gate_up.shape[:-1], inter)


# --------------------------------------------------------------------------------------------------
# Dispatchers: Triton on CUDA, torch elsewhere.
# --------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim of x [..., H], as llama.py's RMSNorm."""
    if available(x.device, x.dtype):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = x + residual and normed = RMSNorm(new_residual)."""
    if available(x.device, x.dtype):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_torch(x, residual, weight, eps)


def rotary_embedding_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place half-split RoPE on q [T, Hq, D] and k [T, Hkv, D]; strided views are fine."""
    if available(q.device, q.dtype):
        return rotary_embedding_triton_(q, k, positions, inv_freq)
    return rotary_embedding_torch_(q, k, positions, inv_freq)


def rotary_embedding_and_store_kv_(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T]
    inv_freq: torch.Tensor,  # [D // 2] float32
    kv_cache_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, < 0 = padding (skipped)
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_embedding_`, then the rotated k and v written to the cache at `slot_mapping`:
    one launch on CUDA (the attention backend is then told the cache already holds them)."""
    if available(q.device, q.dtype):
        return rotary_embedding_triton_(q, k, positions, inv_freq, v, kv_cache_layer, slot_mapping)
    rotary_embedding_torch_(q, k, positions, inv_freq)
    write_kv(k, v, kv_cache_layer, slot_mapping)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up [..., 2I] = [gate | up] (the merged GEMM output) -> [..., I]."""
    if available(gate_up.device, gate_up.dtype):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_torch(gate_up)
