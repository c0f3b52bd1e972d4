"""The collectives of one worker's tensor-parallel ranks.

A process group of its own (its own TCPStore on 127.0.0.1), not torch.distributed's default
group: the default group is the KV transfer's (transfer/nccl_backend.py), and a worker may
hold both. gloo for CPU tensors, NCCL for CUDA ones.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0  # a rank that died or hangs fails the others' collectives after this


class TPGroup:
    """Rank `rank` of `size`; every collective must be called by all ranks in the same order."""

    def __init__(
        self, rank: int, size: int, store: dist.Store, device: torch.device, timeout_s: float
    ) -> None:
        self.rank = rank
        self.size = size
        self.store = store  # kept alive: rank 0's is the server the others reach
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, timeout)

    @classmethod
    def create_store(cls, size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
        """Rank 0's rendezvous server on a free port of 127.0.0.1 (`.port` tells the others)."""
        return dist.TCPStore(
            "127.0.0.1",
            0,
            size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    @classmethod
    def reach_store(cls, rank: int, size: int, port: int, timeout_s: float) -> dist.TCPStore:
        """Rank `rank`'s client of rank 0's store, marked joined (rank 0 waits for these,
        watching for dead ranks, before it forms the group with `TPGroup(...)`)."""
        store = dist.TCPStore(
            "127.0.0.1", port, size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        store.set(cls.joined_key(rank), "1")
        return store

    @staticmethod
    def joined_key(rank: int) -> str:
        return f"tp-rank-{rank}-joined"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        self.group.allreduce([x]).wait()
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank -> [N, size * C], rank r's columns at [r * C, (r + 1) * C)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=1)

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape and dtype everywhere) on rank 0, in rank order; None
        on the other ranks."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        self.group.gather([parts] if parts is not None else [], [x], opts).wait()
        return parts

    def scatter_from_first(self, parts: list[torch.Tensor] | None, out: torch.Tensor) -> torch.Tensor:
        """Rank 0's `parts[r]` into rank r's `out` (every part shaped like `out`), in place;
        `parts` is None on the other ranks."""
        opts = dist.ScatterOptions()
        opts.rootRank = 0
        self.group.scatter([out], [parts] if parts is not None else [], opts).wait()
        return out

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere), in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([x], opts).wait()
        return x
