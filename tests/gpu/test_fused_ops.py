"""Triton fused RMSNorm / residual-add / RoPE / SiLU·mul kernels against llama.py's torch modules.

float32: within 1e-5 relative; bf16/fp16: torch.testing.assert_close's defaults for the dtype (about
2 ulp) and at most 1% of elements differing at all (reduction order may flip a rounding); SiLU·mul in
bf16 has no reduction and must equal torch bit for bit. Runs on CUDA, or on CPU tensors under
TRITON_INTERPRET=1 with smaller shapes (see conftest).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pdserve.engine.model import fused_ops
from pdserve.engine.model.llama import rope_inv_freq


# The torch references, written out here in transformers' op order (llama.py itself now
# calls the fused ops, so it cannot serve as the oracle).
class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding:
    def __init__(self, config) -> None:
        self.inv_freq = rope_inv_freq(config)

    def to(self, device: str) -> RotaryEmbedding:
        self.inv_freq = self.inv_freq.to(device)
        return self

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _round_bf16_in_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter casts float32 -> bf16 by dropping the low bits (round toward zero);
    compiled kernels round to nearest even (LLVM fptrunc), as torch does. Make the interpreter
    round like the GPU so that the CPU run checks the kernels' op order, not the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data: np.ndarray, input_dtype, output_dtype, rounding_mode) -> np.ndarray:
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            as_float = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def check_close(actual: torch.Tensor, expected: torch.Tensor, bitwise_share: float | None = 0.01) -> None:
    """fp32: within 1e-5. bf16/fp16: within torch's default tolerance for the dtype and, unless
    `bitwise_share` is None, at most that share of elements differing at all."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    # Two units in the last place, relative (a 1-ulp difference sits exactly at fp16's default rtol).
    torch.testing.assert_close(actual, expected, rtol=2 * torch.finfo(expected.dtype).eps, atol=1e-5)
    if bitwise_share is not None:
        mismatched = (actual != expected).float().mean().item()
        assert mismatched <= bitwise_share, f"{mismatched:.2%} of elements differ from the torch reference"


def reference_norm(weight: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], eps).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def random_rows(
    T: int, H: int, dtype: torch.dtype, device: str, row_stride: int | None = None
) -> torch.Tensor:
    # [T, H], optionally a view whose rows are row_stride apart (as a slice of a wider output)
    width = row_stride or H
    return (torch.randn(T, width, device=device) * 3).to(dtype)[:, :H]


def norm_shapes(device: str) -> list[tuple[int, int]]:
    if device == "cpu":  # the interpreter runs one Python program per row
        return [(1, 64), (7, 64), (300, 64), (7, 4096), (3, 80)]
    return [(1, 64), (7, 64), (300, 64), (1, 4096), (7, 4096), (300, 4096), (5, 5120), (3, 16384)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: torch.dtype, device: str) -> None:
    for T, H in norm_shapes(device):
        x = random_rows(T, H, dtype, device)
        weight = (torch.rand(H, device=device) + 0.5).to(dtype)
        expected = reference_norm(weight, 1e-6)(x)
        check_close(fused_ops.rms_norm_triton(x, weight, 1e-6), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype: torch.dtype, device: str) -> None:
    for T, H in norm_shapes(device):
        x = random_rows(T, H, dtype, device)
        residual = random_rows(T, H, dtype, device)
        weight = (torch.rand(H, device=device) + 0.5).to(dtype)
        x_before, residual_before = x.clone(), residual.clone()
        normed, new_residual = fused_ops.fused_add_rms_norm_triton(x, residual, weight, 1e-5)
        expected_residual = x + residual
        assert torch.equal(new_residual, expected_residual), "residual add must match torch exactly"
        check_close(normed, reference_norm(weight, 1e-5)(expected_residual))
        assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs were modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_strided_rows_and_3d(dtype: torch.dtype, device: str) -> None:
    # Rows that are slices of a wider tensor (row stride != H), and [T, heads, D] input (qk-norm).
    x = random_rows(9, 128, dtype, device, row_stride=320)
    residual = random_rows(9, 128, dtype, device, row_stride=200)
    weight = torch.randn(128, device=device).to(dtype)
    normed, new_residual = fused_ops.fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, x + residual)
    check_close(normed, reference_norm(weight, 1e-6)(x + residual))
    heads = random_rows(5, 4 * 64, dtype, device, row_stride=6 * 64).view(5, 4, 64)  # strided view
    head_weight = torch.randn(64, device=device).to(dtype)
    check_close(fused_ops.rms_norm_triton(heads, head_weight, 1e-6), reference_norm(head_weight, 1e-6)(heads))


def test_norm_float32_weight_promotes(device: str) -> None:
    # bf16 activations with a float32 weight: torch promotes the final product to float32.
    x = random_rows(4, 64, torch.bfloat16, device)
    weight = torch.rand(64, device=device) + 0.5
    check_close(fused_ops.rms_norm_triton(x, weight, 1e-6), reference_norm(weight, 1e-6)(x))


def test_empty_batch(device: str) -> None:
    x = torch.empty(0, 64, device=device)
    normed, residual = fused_ops.fused_add_rms_norm_triton(x, x, torch.ones(64, device=device), 1e-6)
    assert normed.shape == (0, 64) and residual.shape == (0, 64)


def rope_module(head_dim: int, scaling: dict | None, device: str) -> RotaryEmbedding:
    config = SimpleNamespace(head_dim=head_dim, rope_theta=500000.0, rope_scaling=scaling)
    return RotaryEmbedding(config).to(device)  # type: ignore[arg-type]


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def check_rope(
    T: int, num_q: int, num_kv: int, D: int, dtype: torch.dtype, device: str, scaling: dict | None = None
) -> None:
    # q, k, v as views of one fused qkv projection output [T, (Hq + 2 Hkv) * D].
    qkv = (torch.randn(T, (num_q + 2 * num_kv) * D, device=device) * 2).to(dtype)
    q, k, v = qkv.split([num_q * D, num_kv * D, num_kv * D], dim=-1)
    q, k, v = q.view(T, num_q, D), k.view(T, num_kv, D), v.view(T, num_kv, D)
    v_before = v.clone()
    positions = torch.randint(0, 8192, (T,), device=device)
    rotary = rope_module(D, scaling, device)
    cos, sin = rotary(positions, dtype)
    expected_q, expected_k = apply_rope(q.clone(), cos, sin), apply_rope(k.clone(), cos, sin)
    # The exact rotation of the same (rounded) inputs, in float64, with cos/sin from the same
    # float32 angles: the yardstick for both implementations.
    cos64, sin64 = rotary(positions, torch.float32)
    true_q = apply_rope(q.double(), cos64.double(), sin64.double())
    true_k = apply_rope(k.double(), cos64.double(), sin64.double())
    out_q, out_k = fused_ops.rotary_embedding_triton_(q, k, positions, rotary.inv_freq)
    assert out_q is q and out_k is k
    if dtype == torch.float32:
        check_close(q, expected_q)
        check_close(k, expected_k)
    else:
        # Compiled Triton computes half-precision arithmetic in float32 and rounds once, where
        # torch rounds after each op; so the kernel is at least as close to the exact result as
        # torch, but not bit-equal to it. (Under the interpreter numpy's cos/sin can differ from
        # torch's by an ulp of float32, which moves a half-precision rounding now and then.)
        for got, torch_result, truth in ((q, expected_q, true_q), (k, expected_k, true_k)):
            kernel_err = (got.double() - truth).abs().max().item()
            torch_err = (torch_result.double() - truth).abs().max().item()
            ulp = torch.finfo(dtype).eps * truth.abs().max().item()
            assert kernel_err <= torch_err + ulp, (kernel_err, torch_err)
    assert torch.equal(v, v_before), "v (next to q and k in qkv) was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding(dtype: torch.dtype, heads: tuple[int, int], head_dim: int, device: str) -> None:
    for T in [1, 7, 300] if device == "cuda" else [1, 7, 40]:
        check_rope(T, *heads, head_dim, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_llama3_scaling_and_odd_half(dtype: torch.dtype, device: str) -> None:
    check_rope(9, 4, 2, 128, dtype, device, scaling=LLAMA3_SCALING)
    check_rope(5, 3, 1, 80, dtype, device)  # D // 2 = 40 is not a power of two


def test_rotary_embedding_contiguous_and_int32_positions(device: str) -> None:
    q = torch.randn(6, 4, 64, device=device)
    k = torch.randn(6, 2, 64, device=device)
    positions = torch.arange(100, 106, device=device, dtype=torch.int32)
    rotary = rope_module(64, None, device)
    cos, sin = rotary(positions.long(), q.dtype)
    expected_q, expected_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    fused_ops.rotary_embedding_triton_(q, k, positions, rotary.inv_freq)
    check_close(q, expected_q)
    check_close(k, expected_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_and_store_kv(dtype: torch.dtype, device: str) -> None:
    """RoPE with the cache write fused in: the same q/k as RoPE alone, and the cache holds the
    rotated k and the untouched v at each slot (write_kv's layout); slots < 0 write nothing."""
    from pdserve.engine.attention.metadata import write_kv

    T, num_q, num_kv, D, num_blocks, block_size = 11, 8, 2, 64, 6, 4
    qkv = (torch.randn(T, (num_q + 2 * num_kv) * D, device=device) * 2).to(dtype)
    q, k, v = (x.view(T, -1, D) for x in qkv.split([num_q * D, num_kv * D, num_kv * D], dim=-1))
    positions = torch.randint(0, 4096, (T,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[3] = slots[8] = -1  # padding rows of a captured batch
    inv_freq = rope_module(D, LLAMA3_SCALING, device).inv_freq
    cache = torch.randn(2, num_blocks, block_size, num_kv, D, device=device).to(dtype)
    expected_cache = cache.clone()
    expected_q, expected_k = q.clone(), k.clone()
    fused_ops.rotary_embedding_triton_(expected_q, expected_k, positions, inv_freq)
    keep = slots >= 0
    write_kv(expected_k[keep], v[keep], expected_cache, slots[keep])
    v_before = v.clone()
    fused_ops.rotary_embedding_triton_(q, k, positions, inv_freq, v, cache, slots)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k) and torch.equal(v, v_before)
    assert torch.equal(cache, expected_cache)


def test_torch_fallbacks_match_llama(device: str) -> None:
    x = random_rows(5, 64, torch.bfloat16, device)
    residual = random_rows(5, 64, torch.bfloat16, device)
    weight = torch.randn(64, device=device).to(torch.bfloat16)
    normed, new_residual = fused_ops.fused_add_rms_norm_torch(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, reference_norm(weight, 1e-6)(x + residual))
    q, k = torch.randn(5, 4, 64, device=device), torch.randn(5, 2, 64, device=device)
    positions = torch.arange(5, device=device)
    rotary = rope_module(64, None, device)
    cos, sin = rotary(positions, q.dtype)
    expected_q, expected_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    fused_ops.rotary_embedding_torch_(q, k, positions, rotary.inv_freq)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert fused_ops.available(device) == (device == "cuda")


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    # llama.py's MLP before the fused op: F.silu on the strided gate half, times the up half.
    inter = gate_up.shape[-1] // 2
    return torch.nn.functional.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def check_silu_and_mul(gate_up: torch.Tensor) -> None:
    expected = silu_mul_reference(gate_up)
    actual = fused_ops.silu_and_mul_triton(gate_up)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if gate_up.dtype == torch.bfloat16:
        # Same roundings as torch (silu in float32 rounded to bf16, product rounded again): bit-equal.
        assert torch.equal(actual, expected), f"{(actual != expected).sum().item()} elements differ"
    else:
        # float32: the kernel's expf (libdevice on CUDA, numpy in the interpreter) may differ from
        # torch's CPU exp by an ulp.
        check_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype, device: str) -> None:
    # I below, at, and above one 2048-column chunk, not multiples of it, one not a power of two.
    shapes = [(1, 64), (7, 80), (5, 2048), (3, 2100), (2, 5000)]
    if device == "cuda":
        shapes += [(1, 14336), (300, 14336), (2048, 3000)]
    for T, inter in shapes:
        check_silu_and_mul((torch.randn(T, 2 * inter, device=device) * 4).to(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_extremes_strides_and_empty(dtype: torch.dtype, device: str) -> None:
    # exp(-x) overflowing to inf (silu -> -0), underflowing to 0 (silu -> x), zeros and tiny values.
    gate = torch.tensor([-200.0, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 200.0], device=device)
    up = torch.linspace(-3, 3, gate.numel(), device=device)
    check_silu_and_mul(torch.cat([gate, up])[None, :].to(dtype))
    # Rows of a wider tensor (row stride != 2I) and a 3-D [B, T, 2I] input.
    wide = (torch.randn(6, 2 * 96 + 40, device=device) * 3).to(dtype)
    check_silu_and_mul(wide[:, : 2 * 96])
    check_silu_and_mul((torch.randn(2, 3, 2 * 40, device=device) * 3).to(dtype))
    empty = torch.empty(0, 2 * 64, device=device, dtype=dtype)
    assert fused_ops.silu_and_mul_triton(empty).shape == (0, 64)
    assert fused_ops.silu_and_mul(empty).shape == (0, 64)


def test_silu_and_mul_dispatch(device: str) -> None:
    # The dispatcher (llama.py's MLP calls it): torch on CPU, bit-equal to the old expression.
    gate_up = (torch.randn(5, 2 * 48, device=device) * 3).to(torch.bfloat16)
    assert torch.equal(fused_ops.silu_and_mul(gate_up), silu_mul_reference(gate_up))
    assert torch.equal(fused_ops.silu_and_mul_torch(gate_up), silu_mul_reference(gate_up))
