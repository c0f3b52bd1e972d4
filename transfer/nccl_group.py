"""The one torch.distributed process group the KV transfer runs over (NCCL between GPUs,
gloo on CPU), bounded waits on its operations, and the side stream transfer work runs on.
The send and receive protocol over it is `transfer.nccl_backend`."""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
# A wait that failed after this share of its timeout ran out (rather than failing on a peer's error)
RAN_OUT_FRACTION = 0.9


def wait_for_work(work: dist.Work, timeout_s: float) -> tuple[str | None, bool]:
    """Wait for a send or receive: (None, False) once it completed, else (why, ran_out), where
    `ran_out` says the wait used up its own timeout (then every pair of this rank is gone: see
    "Failure" in `transfer.nccl_backend`), not that it failed early (a peer's error)."""
    started = time.monotonic()
    try:
        if work.wait(timeout=datetime.timedelta(seconds=timeout_s)):
            return None, False
        why = "timed out"
    except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise RuntimeError subclasses
        why = str(exc)
    return why, time.monotonic() - started >= RAN_OUT_FRACTION * timeout_s


def backend_for_device(device: str | torch.device) -> str:
    """ "nccl" for CUDA tensors, "gloo" for CPU ones."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"no torch.distributed transfer backend for device type {device_type!r}")


def init_transfer_group(
    rank: int,
    world_size: int,
    init_method: str,
    device: str | torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Join the one transfer process group (the default torch.distributed group).

    init_method: "tcp://host:port" of rank 0 (a plain "host:port" is accepted too).
    Every worker (prefill and decode) calls this with its own rank. Returns the backend.
    """
    if "://" not in init_method:
        init_method = f"tcp://{init_method}"
    backend = backend_for_device(device)
    if backend == "nccl":
        # Each rank must talk NCCL from its own GPU; the cache lives there.
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


def destroy_transfer_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SideStream:
    """On CUDA, run transfer work on a private stream so it never stalls the engine's stream.

    `work.wait()` on an NCCL op makes the *current* stream wait for the transfer; on the
    engine's stream that would hold up its forward passes until the peer shows up. On CPU
    this is a no-op context.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the side stream current in this thread (safe to use from several threads at once)."""
        if self.stream is None:
            yield
            return
        # Order after everything already queued on the caller's stream (e.g. the prefill
        # forward pass that wrote the blocks about to be packed).
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
