"""The collectives of one worker's tensor-parallel ranks.

A process group of its own (its own TCPStore on 127.0.0.1), not torch.distributed's default
group: the default group is the KV transfer's (transfer/nccl_backend.py), and a worker may
hold both. gloo for CPU tensors, NCCL for CUDA ones.

NCCL collectives are issued as torch's ProcessGroupNCCL does by default: on its own stream,
ordered after the current stream's work by an event, and `.wait()` makes the current stream
wait for them (no host synchronization). That is what a CUDA graph captures (the decode graphs,
engine/cuda_graphs.py): the side stream forks from and joins the capturing stream; nothing is
handed to the watchdog during capture (torch skips it), and the communicator is created by the
first collective, which runs eagerly before any capture.

`shared_device` (EngineConfig.tensor_parallel_shared_device, for testing on one GPU): every rank
on the same CUDA device, the collectives over gloo on host copies of the tensors. gloo's CUDA
support differs per collective and version (gather and scatter have none), and NCCL refuses two
ranks on one device; a host copy is exact and works for all five, at a speed only tests accept.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0  # a rank that died or hangs fails the others' collectives after this


class TPGroup:
    """Rank `rank` of `size`; every collective must be called by all ranks in the same order."""

    def __init__(
        self,
        rank: int,
        size: int,
        store: dist.Store,
        device: torch.device,
        timeout_s: float,
        shared_device: bool = False,
    ) -> None:
        self.rank = rank
        self.size = size
        self.store = store  # kept alive: rank 0's is the server the others reach
        self.device = device
        # Every rank on this one GPU (for testing): collectives over gloo on host copies.
        self.shared_device = device.type == "cuda" and shared_device
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if device.type == "cuda" and not self.shared_device:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            # Its collectives keep their tensors alive until `.wait()` (torch's default since
            # 2.7, no recordStream): what lets them be captured in CUDA graphs.
            self.group = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, timeout)

    @property
    def graph_capturable(self) -> bool:
        """Whether a CUDA graph can capture this group's collectives (NCCL's can, gloo's cannot)."""
        return self.device.type == "cuda" and not self.shared_device

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
        if self.shared_device:
            x.copy_(self._staged(lambda t: self.group.allreduce([t]).wait(), x))
            return x
        self.group.allreduce([x]).wait()
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank -> [N, size * C], rank r's columns at [r * C, (r + 1) * C)."""
        x = x.contiguous() if not self.shared_device else x.contiguous().cpu()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=1).to(self.device)

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape and dtype everywhere) on rank 0, in rank order; None
        on the other ranks."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        x = x.contiguous() if not self.shared_device else x.contiguous().cpu()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        self.group.gather([parts] if parts is not None else [], [x], opts).wait()
        return None if parts is None else [part.to(self.device) for part in parts]

    def scatter_from_first(self, parts: list[torch.Tensor] | None, out: torch.Tensor) -> torch.Tensor:
        """Rank 0's `parts[r]` into rank r's `out` (every part shaped like `out`), in place;
        `parts` is None on the other ranks."""
        opts = dist.ScatterOptions()
        opts.rootRank = 0
        if self.shared_device:
            host_out = torch.empty(out.shape, dtype=out.dtype)
            host_parts = None if parts is None else [part.cpu() for part in parts]
            self.group.scatter([host_out], [host_parts] if host_parts is not None else [], opts).wait()
            return out.copy_(host_out)
        self.group.scatter([out], [parts] if parts is not None else [], opts).wait()
        return out

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere), in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if self.shared_device:
            x.copy_(self._staged(lambda t: self.group.broadcast([t], opts).wait(), x))
            return x
        self.group.broadcast([x], opts).wait()
        return x

    @staticmethod
    def _staged(collective, x: torch.Tensor) -> torch.Tensor:
        """Run `collective` in place on a host copy of `x`; returns the copy."""
        host = x.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        collective(host)
        return host
