"""A tensor-parallel prefill worker's KV pieces staged to host on a GPU (`PieceFiller`): each
piece arrives complete (the engine synchronized it), so its copy must not queue on the engine's
stream, the device's default one: there it would wait for every step the engine has queued, and
the engine's next kernels would wait behind it."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.transfer.source import LayerPieces, PieceFiller

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = (4, 2, 8, 16, 2, 64)  # [layers, 2, blocks, block_size, Hkv, D]


def _sleep_cycles_for(seconds: float) -> int:
    """GPU clock cycles that `torch.cuda._sleep` spins for about `seconds` on this GPU."""
    cycles = 10_000_000
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    return int(cycles * seconds / max(time.perf_counter() - start, 1e-6))


def test_pieces_are_staged_beside_the_engine_stream_not_behind_it() -> None:
    whole = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    ready = iter([whole[0:2].clone(), whole[2:4].clone()])  # two pieces of two layers
    torch.cuda.synchronize()  # what gather_kv does before a piece is handed out
    source = LayerPieces(lambda layers: next(ready), SHAPE, torch.bfloat16, "cuda:0", 2)
    host = torch.empty(whole.numel() * whole.element_size(), dtype=torch.uint8, pin_memory=True)
    busy_s = 2.0
    torch.cuda._sleep(_sleep_cycles_for(busy_s))  # the engine's queued steps, on the default stream
    start = time.perf_counter()
    filler = PieceFiller(source, host, "r")
    filler.ready(-1)
    staged_s = time.perf_counter() - start
    engine_still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    filler.stop()
    assert staged_s < busy_s / 4, f"staging took {staged_s:.2f} s: it waited for the engine's stream"
    assert engine_still_busy  # (so the timing above means something)
    assert torch.equal(host.view(torch.bfloat16).view(SHAPE), whole.cpu())
