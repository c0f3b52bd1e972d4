"""The sizes of bench.gpu's rows (`--small` shrinks them so a run takes seconds on CPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shapes:
    """Sizes of every row; `--small` shrinks them so the whole run takes seconds on CPU."""

    decode_context: int = 512
    batch_decode_size: int = 128
    batch_decode_context: int = 1024
    transformers_batch: int = 32  # the README's transformers figure is at batch 32
    decode_steps: int = 128  # timed steps (pdserve) = new tokens timed (transformers)
    warmup_steps: int = 8
    prefill_tokens: int = 2048
    prefill_reps: int = 5
    num_requests: int = 1000
    transformers_requests: int = 64
    prompt_len: int = 512
    output_len: int = 128
    pack_blocks: int = 128
    pack_iters: int = 10


SMALL = Shapes(32, 8, 64, 4, 8, 2, 64, 3, 16, 8, 32, 8, 8, 5)
