"""Attention that also returns its log-sum-exp, and the merge of partial results.

A prefill chunk whose sequence has a cached prefix attends to two key ranges: the prefix (every
query sees every key: no mask) and its own new tokens (causal, a square). Each range runs as one
FlashAttention-class call (the chunk's own K/V read in place from the fused qkv output, the
prefix's gathered out of the paged cache), and the two partial results combine exactly through
their log-sum-exps (the split-K merge of flash-decoding):

    lse = log(exp(lse_a) + exp(lse_b)),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

On CUDA the partial attention is cuDNN's fused attention (`aten._scaled_dot_product_cudnn_attention`,
the kernel behind SDPA's cuDNN backend, which returns the log-sum-exp SDPA's public call drops).
On an H100 it reaches about 620 TFLOP/s causal at 8,192 tokens where the paged Triton kernel
reaches 420 (bench/results/ATTENTION.md). On CPU the same contract runs in plain torch, so CI
checks the split and the merge against the reference attention.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# (device index, dtype, head_dim) -> whether the Triton merge runs there and matches torch's
_TRITON_MERGE_OK: dict[tuple, bool] = {}
# (device index, dtype, head_dim, gqa, q/k/v strides) -> False: the cuDNN op works with
# grouped-query heads as they are; True: only with K/V expanded per query head; None: not usable
# there. Strides are part of the key: the op reads q, k, v in place (strided views of the fused
# qkv output, or a gathered prefix), so each layout it meets is checked once as it comes.
_CUDNN_MODE: dict[tuple, bool | None] = {}


def _math_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float32: the CPU path and the oracle of the cuDNN path."""
    group = q.shape[1] // k.shape[1]
    k32 = k.float().repeat_interleave(group, dim=1)  # GQA: each KV head serves `group` query heads
    v32 = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k32) * scale  # [Hq, n, m]
    if causal:  # top-left aligned; used only with n == m (a chunk against its own keys)
        future = torch.ones(scores.shape[1:], dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), v32)
    return out.to(q.dtype), lse


def _cudnn_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, expand_kv: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_q_heads, _ = q.shape
    if expand_kv:  # a cuDNN build without grouped-query support: one K/V copy per query head
        group = num_q_heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # [n, H, D] -> [1, H, n, D] views of token-major tensors, read in place: q, k, v arrive as
    # strided views of the fused qkv output (copying them cost 23 ms of a 32k prefill in 8,192-token
    # chunks on an H100); `_cudnn_mode` checked the op on these very strides.
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q4, k4, v4, None, True, 0.0, causal, False, scale=scale
    )
    out, lse = result[0], result[1]  # [1, Hq, n, D]; [1, Hq, n] (or [1, Hq, n, 1]) float32
    return out[0].transpose(0, 1), lse.reshape(num_q_heads, num_tokens)


def _cudnn_works(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, expand_kv: bool) -> bool:
    """Whether the cuDNN op runs here and matches plain torch, on a small input of these head
    counts, head size and strides (checked once per layout: the op is private, so trust nothing)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand_like_layout(x: torch.Tensor, rows: int = 40) -> torch.Tensor:
        """[rows, H, D] random values laid out with x's strides (rows of x.stride(0) elements)."""
        size = (rows - 1) * x.stride(0) + (x.shape[1] - 1) * x.stride(1) + (x.shape[2] - 1) * x.stride(2) + 1
        flat = torch.randn(size, generator=generator).to(device=x.device, dtype=x.dtype)
        return flat.as_strided((rows, x.shape[1], x.shape[2]), x.stride())

    tq, tk, tv = rand_like_layout(q), rand_like_layout(k), rand_like_layout(v)
    dim = q.shape[2]
    try:
        for causal in (True, False):
            out, lse = _cudnn_attention_with_lse(tq, tk, tv, dim**-0.5, causal, expand_kv)
            ref_out, ref_lse = _math_attention_with_lse(tq, tk, tv, dim**-0.5, causal)
            if not torch.allclose(lse, ref_lse, atol=2e-2) or not torch.allclose(
                out.float(), ref_out.float(), atol=3e-2
            ):
                return False
    except RuntimeError:  # not built with cuDNN attention, or these shapes unsupported
        return False
    return True


def lse_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when `attention_with_lse` has a fast kernel for these shapes and strides (always on
    CPU: plain torch)."""
    if not q.is_cuda:
        return True
    return _cudnn_mode(q, k, v) is not None


def _cudnn_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool | None:
    """Whether K/V must be expanded for the cuDNN op here (see `_CUDNN_MODE`), checked once per
    layout (a layout whose last dim is strided is never handed to the op: None)."""
    gqa = q.shape[1] != k.shape[1]
    key = (q.device.index, q.dtype, q.shape[2], gqa, q.stride(), k.stride(), v.stride())
    if key not in _CUDNN_MODE:
        if any(x.stride(2) != 1 for x in (q, k, v)):
            _CUDNN_MODE[key] = None
        elif _cudnn_works(q, k, v, expand_kv=False):
            _CUDNN_MODE[key] = False
        elif gqa and _cudnn_works(q, k, v, expand_kv=True):
            _CUDNN_MODE[key] = True
        else:
            _CUDNN_MODE[key] = None
        if _CUDNN_MODE[key] is None:  # the caller takes the paged kernel: slower, still exact
            logger.warning("cuDNN fused attention refused for layout %s; using the paged kernel there", key)
    return _CUDNN_MODE[key]


def attention_with_lse(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [m, Hkv, D]
    v: torch.Tensor,  # [m, Hkv, D]
    scale: float,
    causal: bool,  # query i sees keys 0..i (n == m), else every key
) -> tuple[torch.Tensor, torch.Tensor]:  # out [n, Hq, D] in q's dtype, lse [Hq, n] float32
    """Softmax attention of q over k/v and each row's natural log-sum-exp of its scaled scores."""
    if not q.is_cuda:
        return _math_attention_with_lse(q, k, v, scale, causal)
    expand_kv = _cudnn_mode(q, k, v)
    if expand_kv is None:
        raise RuntimeError("cuDNN fused attention is not usable on this device (lse_attention_supported)")
    return _cudnn_attention_with_lse(q, k, v, scale, causal, expand_kv)


def _triton_merge_works(out_a: torch.Tensor) -> bool:
    """Whether the one-pass Triton merge runs here and equals the torch merge on a small random
    input of this dtype and head size (checked once per device, like the cuDNN op: a failure
    only costs the faster merge)."""
    key = (out_a.device.index, out_a.dtype, out_a.shape[-1])
    if key not in _TRITON_MERGE_OK:
        _TRITON_MERGE_OK[key] = False
        try:
            # Triton: imported on CUDA only
            from pdserve.engine.attention.triton_merge import merge_into, merge_supported

            if merge_supported(out_a):
                generator = torch.Generator(device="cpu").manual_seed(0)
                parts = [torch.randn(40, 3, out_a.shape[-1], generator=generator) for _ in range(2)]
                lses = [torch.randn(3, 40, generator=generator) * 3 for _ in range(2)]
                a, b = (p.to(device=out_a.device, dtype=out_a.dtype) for p in parts)
                la, lb = (x.to(out_a.device) for x in lses)
                want, want_lse = _torch_merge(a, la, b, lb, None)
                got = a.new_empty(a.shape, dtype=torch.float32)
                got_lse = merge_into(got, a, la, b, lb)
                _TRITON_MERGE_OK[key] = torch.allclose(got, want, atol=1e-4) and torch.allclose(
                    got_lse, want_lse, atol=1e-4
                )
        except Exception as error:  # no Triton, or the kernel fails to compile or run here
            logger.warning("Triton merge of partial attention unusable (%s); merging in torch", error)
    return _TRITON_MERGE_OK[key]


def merge_partials(
    out_a: torch.Tensor,  # [n, Hq, D] attention over one key range
    lse_a: torch.Tensor,  # [Hq, n] float32
    out_b: torch.Tensor,  # [n, Hq, D] attention over a disjoint key range
    lse_b: torch.Tensor,  # [Hq, n]
    out: torch.Tensor | None = None,  # [n, Hq, D] where to write (may be out_a); None: new float32
) -> tuple[torch.Tensor, torch.Tensor]:  # out [n, Hq, D] over both ranges, lse [Hq, n]
    """Exact attention over the union of two key ranges from the partial results. On CUDA one
    Triton pass (`triton_merge`); on CPU plain torch, the oracle."""
    if out_a.is_cuda and _triton_merge_works(out_a):
        from pdserve.engine.attention.triton_merge import merge_into

        dst = out if out is not None else out_a.new_empty(out_a.shape, dtype=torch.float32)
        return dst, merge_into(dst, out_a, lse_a, out_b, lse_b)
    return _torch_merge(out_a, lse_a, out_b, lse_b, out)


def _torch_merge(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).t().unsqueeze(-1)  # [n, Hq, 1]
    weight_b = torch.exp(lse_b - lse).t().unsqueeze(-1)
    merged = out_a.float() * weight_a
    merged.addcmul_(out_b.float(), weight_b)
    if out is None:
        return merged, lse
    return out.copy_(merged), lse


__all__ = ["attention_with_lse", "lse_attention_supported", "merge_partials"]
