"""Host lists -> device tensors for a step's inputs, without stalling on the GPU's queue."""

from __future__ import annotations

import numpy as np
import torch

# numpy turns a long list of ints into an array ~3x faster than torch.tensor (0.5 vs 1.7 ms for a
# 32,768-token prompt's ids; a long prefill step converts three such lists before its forward)
_NUMPY_INTS = {torch.int64: np.int64, torch.int32: np.int32}


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device` without stalling the host on the GPU's queue.

    On CUDA the values go through pinned memory with a non-blocking copy: a copy from
    pageable memory would wait for every kernel already queued, which would end the
    overlap of host and GPU work that async scheduling depends on.
    """
    if dtype in _NUMPY_INTS:
        return to_device(torch.from_numpy(np.asarray(values, dtype=_NUMPY_INTS[dtype])), device)
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` (pinned, non-blocking on CUDA; see `host_to_device`)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def copy_into(dst: torch.Tensor, values: list | torch.Tensor) -> None:
    """Copy host values (a list, or a host tensor) into the device tensor `dst` (same pinned,
    non-blocking path as `host_to_device`, for static buffers such as CUDA-graph inputs)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dst.dtype)
    if dst.is_cuda:
        host = host.pin_memory()
    dst.copy_(host, non_blocking=True)


def padded_table(rows: list[list[int]], width: int) -> torch.Tensor:
    """[len(rows), width] int32 host tensor, each row zero-padded (block tables).

    Row copies into one numpy array: about 3x faster than torch.tensor on nested lists
    (0.7 vs 2.1 ms for 512 rows of ~40 blocks), which is host time every step pays.
    """
    table = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return torch.from_numpy(table)
