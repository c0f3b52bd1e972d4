"""The Triton block copy behind `pack_blocks`/`unpack_blocks`, bit for bit against torch.

On CUDA this also checks that `pack_blocks`/`unpack_blocks` take the Triton path and that a
Llama-3-8B-shaped request (block_elems = 16*8*128, several programs per block) round-trips.
With TRITON_INTERPRET=1 on CPU the kernel calls run in the interpreter (small shapes).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the kernels need it; CI machines have none

from pdserve.transfer import packing, triton_packing
from pdserve.transfer.packing import layer_chunks, pack_blocks, unpack_blocks

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    # [L, 2, num_blocks, block_size, Hkv, D]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_gather_scatter_bit_exact(dtype: torch.dtype, device: str) -> None:
    shape = (4, 2, 12, 4, 2, 8)  # block_elems = 64
    src = random_cache(shape, dtype, device, seed=1)
    ids = [9, 0, 4, 4, 11]  # a gather may repeat ids
    index = torch.tensor(ids, device=device)
    for layers in layer_chunks(4, 3):  # [0:3], [3:4]
        out = torch.empty((layers.stop - layers.start, 2, len(ids), 4, 2, 8), dtype=dtype, device=device)
        triton_packing.gather_blocks(src[layers], index, out)
        assert torch.equal(bits(out), bits(src[layers].index_select(2, index)))
        dst_ids = torch.tensor([3, 10, 0, 7, 5], dtype=torch.int32, device=device)
        dst = torch.zeros_like(src)
        triton_packing.scatter_blocks(dst[layers], out, dst_ids)
        expected = torch.zeros_like(src)
        expected[layers].index_copy_(2, dst_ids.long(), out)
        assert torch.equal(bits(dst), bits(expected))


def test_pack_unpack_use_triton_on_cuda_and_round_trip_a_llama_request() -> None:
    if not torch.cuda.is_available():
        pytest.skip("the dispatch to Triton is CUDA-only")
    cache = random_cache((32, 2, 300, 16, 8, 128), torch.bfloat16, "cuda", seed=2)
    assert packing._triton_for(cache, 128) is triton_packing
    generator = torch.Generator().manual_seed(3)
    src_ids = torch.randperm(300, generator=generator)[:128].tolist()
    dst_ids = torch.randperm(300, generator=generator)[:128].tolist()
    buffer = pack_blocks(cache, src_ids)  # [32, 2, 128, 16, 8, 128]
    src_index = torch.tensor(src_ids, device="cuda")
    assert torch.equal(bits(buffer), bits(cache.index_select(2, src_index)))
    dst = torch.zeros_like(cache)
    for layers in layer_chunks(32, 8):  # as the pipelined receiver does
        unpack_blocks(dst, buffer[layers], dst_ids, layers=layers)
    expected = torch.zeros_like(cache)
    expected.index_copy_(2, torch.tensor(dst_ids, device="cuda"), buffer)
    assert torch.equal(bits(dst), bits(expected))
    pooled = torch.empty_like(buffer)
    pack_blocks(cache, src_ids, out=pooled[8:16], layers=slice(8, 16))
    assert torch.equal(bits(pooled[8:16]), bits(buffer[8:16]))
