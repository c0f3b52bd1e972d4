"""The one-row GEMV kernel (batch-1 decode's linear layers) against F.linear.

Sums run in a different order than cuBLAS, so bf16/fp16 outputs agree to rounding: within 1% of
the largest output, against the float64 product. Runs on CUDA, or on CPU tensors under
TRITON_INTERPRET=1 (see conftest).
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.model import gemv

# (N, K): Llama-3-8B-like ratios, small enough for the interpreter; K = 1,536 is not a multiple of
# 1,024 (the kernel halves its chunk); K = 10,240 takes the long-row config.
SHAPES = [(64, 128), (96, 1536), (32, 10240), (8, 4096)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(
    dtype: torch.dtype, shape: tuple[int, int], with_bias: bool, device: str
) -> None:
    n, k = shape
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    got = gemv.gemv_triton(x, weight, bias)
    exact = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    assert got.shape == (1, n) and got.dtype == dtype
    scale = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 1e-2 * scale
    cublas = torch.nn.functional.linear(x, weight, bias).double()
    assert (got.double() - cublas).abs().max().item() <= 1e-2 * scale


def test_shapes_the_kernel_cannot_take_fall_back(device: str) -> None:
    x = torch.randn(1, 100, device=device, dtype=torch.bfloat16)  # no power-of-two chunk >= 16 divides K
    weight = torch.randn(6, 100, device=device, dtype=torch.bfloat16)  # N not a multiple of BLOCK_N
    torch.testing.assert_close(gemv.gemv_triton(x, weight), torch.nn.functional.linear(x, weight))


def test_linear_dispatch(device: str) -> None:
    layer = torch.nn.Linear(64, 32, bias=False).to(device, torch.bfloat16)
    one, many = torch.randn(1, 64, device=device, dtype=torch.bfloat16), torch.randn(3, 64, device=device)
    torch.testing.assert_close(gemv.linear(many.to(torch.bfloat16), layer), layer(many.to(torch.bfloat16)))
    out = gemv.linear(one, layer)
    assert out.shape == (1, 32)
    if device == "cpu":  # the dispatcher sends only CUDA tensors to the kernel
        assert torch.equal(out, layer(one))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128), (48, 1536), (16, 10240)])
def test_gemv_silu_mul_epilogue(dtype: torch.dtype, shape: tuple[int, int], device: str) -> None:
    from pdserve.engine.model import fused_ops

    n, k = shape  # n = 2 * intermediate: rows [gate | up]
    gen = torch.Generator().manual_seed(7 * n + k)
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    weight = (torch.randn(n, k, generator=gen) * 3 / k**0.5).to(device, dtype)
    got = gemv.gemv_triton(x, weight, silu_mul_out=True)
    assert got.shape == (1, n // 2) and got.dtype == dtype
    exact = fused_ops.silu_and_mul_torch(x.double() @ weight.double().T)
    scale = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2e-2 * scale
    if dtype == torch.bfloat16:  # the same sums and roundings as the two-kernel path, bit for bit
        assert torch.equal(got, fused_ops.silu_and_mul_triton(gemv.gemv_triton(x, weight)))
    layer = torch.nn.Linear(k, n, bias=False).to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    many = torch.randn(3, k, generator=gen).to(device, dtype)
    assert torch.equal(gemv.linear_silu_mul(many, layer), fused_ops.silu_and_mul(layer(many)))
