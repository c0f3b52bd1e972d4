"""Helpers the Triton attention kernels share (`triton_backend`, `triton_decode`)."""

from __future__ import annotations

import functools

import torch

LOG2_E = 1.4426950408889634  # the kernels use exp2: scores are pre-multiplied by log2(e)


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter on CPU: pretend to be an H100 so grids match
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # float32 must stay exact to 1e-4 against the reference: no TF32 tensor-core rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_wide_offsets(key_cache: torch.Tensor) -> bool:
    # Element offsets inside one layer's K (or V) cache fit int32 up to 2^31 elements; int32
    # address math halves the registers the gathered [N, D] pointer tiles need.
    return key_cache.stride(0) * key_cache.shape[0] >= 2**31
