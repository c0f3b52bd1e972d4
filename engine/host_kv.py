"""The host tier's memory and copies: block slots in (pinned, on CUDA) host memory.

Device cache: [num_layers, 2, num_blocks, block_size, Hkv, D]. Host slots are layer-major,
[num_layers, num_slots, 2, block_size, Hkv, D]: one layer's run of consecutive slots is one
contiguous piece of host memory, so one copy moves a whole run of a layer, and loads can go
layer by layer. A step's copies are sorted by slot, so what the tier gave consecutive slots
(a prompt's blocks, evicted together) moves in one piece whatever GPU blocks it maps to:
the device side gathers and scatters with index ops.

Copies go through a device staging buffer of at most `STAGING_BYTES` (smaller when the pool
or the cache is smaller); a step that moves more goes in chunks, in order:
- offload (GPU -> host): the step's evicted blocks are gathered into the buffer in slot
  order (one `index_select`, as many layers at once as fit), then each run of each layer is
  one device-to-host copy;
- load (host -> GPU), layer by layer: each run is one host-to-device copy into the buffer,
  then one `index_copy_` scatters the layer's blocks into the cache.

On CUDA the copies run on the pool's own stream, in issue order (offloads, then loads),
after the engine stream's work queued so far (which wrote the blocks' contents, and last
read the blocks now handed to a new owner). The engine stream waits for the offload's
gathers before the step's forward (the evicted blocks' new owners overwrite them); the
device-to-host copies of the last chunk run on during the forward (earlier chunks' copies
come before the later gathers: they share the buffer). Each layer's loads record an event
and that layer's attention waits for it (a forward pre-hook on the attention modules,
installed only while loads are pending), so the forward's other work, and earlier layers'
attention, overlap the loads. On CPU the same code runs in order, without streams.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch

from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.host_tensors import host_to_device

# Cap on the device staging buffer: 128 MiB holds one layer of a 32k-token prompt's blocks
# for a Llama-3-8B shape (2,000 blocks x 64 KiB), so such a load is one copy per layer.
STAGING_BYTES = 128 * 2**20


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Ascending slots -> (index of the run's first entry, first slot, length) for each run
    of consecutive slots; each run is one copy per layer."""
    runs: list[tuple[int, int, int]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((index, slot, 1))
    return runs


def _clip(runs: list[tuple[int, int, int]], first: int, last: int) -> list[tuple[int, int, int]]:
    """The parts of `runs` within entries [first, last), indices made relative to `first`."""
    clipped = []
    for index, slot, length in runs:
        start, end = max(index, first), min(index + length, last)
        if start < end:
            clipped.append((start - first, slot + start - index, end - start))
    return clipped


def _as_words(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as 8-byte elements when rows allow (bf16 head_dim 128: 32 words a
    row): index kernels move one element per thread, so wider elements move bytes faster.
    Copies between two such views are plain byte copies, as between the originals."""
    if tensor.element_size() < 8 and tensor.shape[-1] * tensor.element_size() % 8 == 0:
        return tensor.view(torch.int64)
    return tensor


class HostKVPool:
    """The host tier's slots and the copies between them and the device cache.

    `attention_layers`: the model's attention modules in layer order; layer i's waits for
    the loads of layer i (none given: the forward waits for all loads before it starts).
    `staging_bytes`: the staging buffer's cap (default `STAGING_BYTES`)."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_slots: int,
        attention_layers: Sequence[torch.nn.Module] = (),
        staging_bytes: int | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        num_layers, two, num_blocks, block_size, num_heads, head_dim = kv_cache.shape
        self.device = kv_cache.device
        self.on_cuda = self.device.type == "cuda"
        block_shape = (two, block_size, num_heads, head_dim)  # one layer of one block
        shape = (num_layers, num_slots, *block_shape)
        self.slots = torch.zeros(shape, dtype=kv_cache.dtype, pin_memory=self.on_cuda)
        layer_block_bytes = self.slots[0, 0].numel() * self.slots.element_size()
        self.bytes_per_block = num_layers * layer_block_bytes
        cap = STAGING_BYTES if staging_bytes is None else staging_bytes
        # layer-blocks the staging buffer holds; a step moves at most min(slots, blocks) blocks
        self.staging_blocks = max(1, min(cap // layer_block_bytes, num_slots, num_blocks))
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        with self._on_copy_stream():
            self.staging = torch.empty(
                (self.staging_blocks, *block_shape), dtype=kv_cache.dtype, device=self.device
            )
        # what the copies work on: the same memory, as wide elements where rows allow
        self._cache, self._slots, self._staging = (_as_words(t) for t in (kv_cache, self.slots, self.staging))
        self.attention_layers = list(attention_layers)
        self._pending: dict[int, torch.cuda.Event | None] = {}  # layer -> its loads' event
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._load_timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self.num_layer_waits = 0  # layers whose attention waited for its loads (a metric)
        # copies issued each way (runs of slots x layers; metrics)
        self.num_offload_copies = 0
        self.num_load_copies = 0

    def run(self, copies: BlockCopies) -> None:
        """Queue the step's copies (offloads first); the engine stream waits for what it must."""
        if not copies:
            return
        engine_stream = torch.cuda.current_stream(self.device) if self.on_cuda else None
        with self._on_copy_stream():
            if engine_stream is not None:
                self.stream.wait_stream(engine_stream)
            if copies.offloads:
                gathered = self._offload(copies.offloads)
                if engine_stream is not None:
                    engine_stream.wait_event(gathered)  # before new owners overwrite the blocks
            if copies.onloads:
                self._load(copies.onloads)

    def wait_for_loads(self) -> None:
        """The engine stream waits for every pending load; the pre-hooks come off. Called
        after the forward is queued (a no-op if its layers waited already) and before a
        forward that runs no hooks (a CUDA graph's replay)."""
        for layer in list(self._pending):
            self._wait_layer(layer)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def synchronize(self) -> None:
        """Block the host until every queued copy is done."""
        if self.stream is not None:
            self.stream.synchronize()
        self._pending.clear()
        self.wait_for_loads()  # only removes the hooks now

    def last_load_seconds(self) -> float | None:
        """GPU time of the latest step's loads on the copy stream (None on CPU or before any)."""
        if self._load_timing is None:
            return None
        start, end = self._load_timing
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _on_copy_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _record(self, enable_timing: bool = False) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=enable_timing)
        event.record(self.stream)
        return event

    def _offload_chunks(self, num: int) -> list[tuple[int, int, int, int]]:
        """(first layer, last layer, first entry, last entry) pieces of `num` blocks that fit
        the staging buffer: all blocks and as many layers as fit, else one layer at a time."""
        num_layers = self.slots.shape[0]
        if num <= self.staging_blocks:
            step = min(num_layers, self.staging_blocks // num)
            return [(lo, min(lo + step, num_layers), 0, num) for lo in range(0, num_layers, step)]
        step = self.staging_blocks
        return [
            (layer, layer + 1, lo, min(lo + step, num))
            for layer in range(num_layers)
            for lo in range(0, num, step)
        ]

    def _offload(self, pairs: list[tuple[int, int]]) -> torch.cuda.Event | None:
        """(GPU block, slot) pairs: gather, copy out; returns the event after the last gather."""
        pairs = sorted(pairs, key=lambda pair: pair[1])
        block_ids = host_to_device([block for block, _ in pairs], torch.int64, self.device)
        runs = slot_runs([slot for _, slot in pairs])
        non_blocking = self.on_cuda
        gathered = None
        staging = self._staging
        for lo, hi, first, last in self._offload_chunks(len(pairs)):
            staged = staging.view(-1)[: (hi - lo) * (last - first) * staging[0].numel()]
            staged = staged.view(hi - lo, last - first, *staging.shape[1:])
            # [layers, blocks, 2, bs, H, D]: the cache viewed block-major per layer
            source = self._cache[lo:hi].transpose(1, 2)
            torch.index_select(source, 1, block_ids[first:last], out=staged)
            gathered = self._record()
            for index, slot, length in _clip(runs, first, last):
                for layer in range(lo, hi):
                    self._slots[layer, slot : slot + length].copy_(
                        staged[layer - lo, index : index + length], non_blocking=non_blocking
                    )
                    self.num_offload_copies += 1
        return gathered

    def _load(self, pairs: list[tuple[int, int]]) -> None:
        """(slot, GPU block) pairs, layer by layer: copy in, scatter; an event per layer."""
        pairs = sorted(pairs)
        block_ids = host_to_device([block for _, block in pairs], torch.int64, self.device)
        runs = slot_runs([slot for slot, _ in pairs])
        num, step = len(pairs), self.staging_blocks
        non_blocking = self.on_cuda
        start = self._record(enable_timing=True)
        for layer in range(self.slots.shape[0]):
            for first in range(0, num, step):
                last = min(first + step, num)
                staged = self._staging[: last - first]
                for index, slot, length in _clip(runs, first, last):
                    staged[index : index + length].copy_(
                        self._slots[layer, slot : slot + length], non_blocking=non_blocking
                    )
                    self.num_load_copies += 1
                # cache[layer] is [2, blocks, bs, H, D]; staged [n, 2, bs, H, D]
                self._cache[layer].index_copy_(1, block_ids[first:last], staged.transpose(0, 1))
            self._pending[layer] = self._record()
        if start is not None:
            self._load_timing = (start, self._record(enable_timing=True))
        self._install_hooks()

    def _install_hooks(self) -> None:
        if self._hooks:
            return
        for layer, module in enumerate(self.attention_layers):
            hook = functools.partial(self._before_attention, layer)
            self._hooks.append(module.register_forward_pre_hook(hook))

    def _before_attention(self, layer: int, _module: torch.nn.Module, _args: tuple) -> None:
        if self._wait_layer(layer):
            self.num_layer_waits += 1

    def _wait_layer(self, layer: int) -> bool:
        """The engine stream waits for `layer`'s pending loads; False if none were pending."""
        if layer not in self._pending:
            return False
        event = self._pending.pop(layer)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return True
