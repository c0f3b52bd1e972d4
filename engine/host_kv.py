"""The host tier's memory and copies: block slots in (pinned, on CUDA) host memory.

On CUDA the slots are pageable pages of exactly their size pinned in place
(engine/host_memory.py), not torch's pinned allocator (which rounds up to a power of two),
registered layer by layer (up to 4 GiB at a time), so every copy below is within one
registration and stays asynchronous.

Device cache: [num_layers, 2, num_blocks, block_size, Hkv, D]. Host slots are layer-major,
[num_layers, num_slots, 2, block_size, Hkv, D]: one layer's run of consecutive slots is one
contiguous piece of host memory, so one copy moves a whole run of a layer, and copies can go
layer by layer. A step's copies are sorted by slot, so what the tier gave consecutive slots
(a prompt's blocks, evicted together: core/host_tier.py) moves in one piece whatever GPU
blocks it maps to: the device side gathers and scatters with index ops.

Each direction has a device staging buffer of at most `STAGING_BYTES` (smaller when the pool
or the cache is smaller); a step that moves more goes in chunks, in order:
- offload (GPU -> host): the step's evicted blocks are gathered into the buffer in slot
  order (one `index_select`, as many layers at once as fit), then each run of each layer is
  one device-to-host copy;
- load (host -> GPU), layer by layer: each run is one host-to-device copy into the buffer,
  then one `index_copy_` scatters the layer's blocks into the cache.

On CUDA each direction runs on a stream of its own, so a step's offload (device to host)
and load (host to device) share the link's two directions. Both streams start after the
engine stream's work queued so far (which wrote the blocks' contents, and last read the
blocks now handed to a new owner). Layer by layer, the load's scatter waits for the
offload's gather of that layer (the blocks a step loads into are often the ones it evicted),
and a load waits for earlier steps' offloads to end (the slots they wrote), and for the
same step's when it reads a slot that one writes.
Each layer gets a ready event (its loads, else the offload's gather), and that layer's
attention waits for it (a forward pre-hook on the attention modules, installed only while
copies are pending): the forward's other work and earlier layers overlap the copies. A
chunked offload gathers its next chunk only after the previous chunk left the buffer. On
CPU the same code runs in order, without streams.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence

import torch

from pdserve.engine.core.host_tier import BlockCopies
from pdserve.engine.host_memory import HostMemory
from pdserve.engine.host_tensors import host_to_device

# Cap on each direction's staging buffer: 128 MiB holds one layer of a 32k-token prompt's
# blocks for a Llama-3-8B shape (2,000 blocks x 64 KiB), so such a load is a copy per layer.
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


class _Lane:
    """One direction's stream (None on CPU) and staging buffer [blocks, 2, bs, H, D]."""

    def __init__(self, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with self.active():
            self.staging = torch.empty(shape, dtype=dtype, device=device)
        self.words = _as_words(self.staging)
        self.timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # latest run's

    def active(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self, enable_timing: bool = False) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=enable_timing)
        event.record(self.stream)
        return event

    def wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.stream.wait_event(event)

    def seconds(self) -> float | None:
        """GPU time of the latest run on this lane (None on CPU or before any)."""
        if self.timing is None:
            return None
        start, end = self.timing
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class HostKVPool:
    """The host tier's slots and the copies between them and the device cache.

    `attention_layers`: the model's attention modules in layer order; layer i's waits for
    the copies of layer i (none given: the runner's `wait_for_copies` after the forward is
    queued is the only wait, which is correct only if nothing in the forward touches the
    blocks). `staging_bytes`: each staging buffer's cap (default `STAGING_BYTES`)."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_slots: int,
        attention_layers: Sequence[torch.nn.Module] = (),
        staging_bytes: int | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        num_layers, two, num_blocks, block_size, num_heads, head_dim = kv_cache.shape
        self.num_layers = num_layers
        self.device = kv_cache.device
        block_shape = (two, block_size, num_heads, head_dim)  # one layer of one block
        shape = (num_layers, num_slots, *block_shape)
        layer_block_bytes = math.prod(block_shape) * kv_cache.element_size()
        self._memory: HostMemory | None = None
        if self.device.type == "cuda":  # pinned in place, exactly this size (engine/host_memory.py)
            layer_bytes = num_slots * layer_block_bytes  # a copy stays within one layer's slots
            self._memory = HostMemory(num_layers * layer_bytes, True, layer_bytes, self.device)
            self.slots = self._memory.tensor.view(kv_cache.dtype).view(shape)
        else:
            self.slots = torch.zeros(shape, dtype=kv_cache.dtype)
        self.bytes_per_block = num_layers * layer_block_bytes
        cap = STAGING_BYTES if staging_bytes is None else staging_bytes
        # layer-blocks a staging buffer holds; a step moves at most min(slots, blocks) blocks
        self.staging_blocks = max(1, min(cap // layer_block_bytes, num_slots, num_blocks))
        staging_shape = (self.staging_blocks, *block_shape)
        self._out = _Lane(self.device, staging_shape, kv_cache.dtype)  # offloads
        self._in = _Lane(self.device, staging_shape, kv_cache.dtype)  # loads
        self.staging_bytes = 2 * self._in.staging.numel() * self._in.staging.element_size()
        # what the copies work on: the same memory, as wide elements where rows allow
        self._cache, self._slots = _as_words(kv_cache), _as_words(self.slots)
        self.attention_layers = list(attention_layers)
        self._pending: dict[int, torch.cuda.Event | None] = {}  # layer -> when it is ready
        self._saved: torch.cuda.Event | None = None  # the end of the latest offload
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.num_layer_waits = 0  # layers whose attention waited for the tier's copies (metric)
        self.last_queue_seconds = 0.0  # host time the latest `run` took to queue its copies
        # blocks moved and copies issued each way (runs of slots x layers; metrics)
        self.num_offloaded_blocks = self.num_loaded_blocks = 0
        self.num_offload_copies = self.num_load_copies = 0

    def run(self, copies: BlockCopies) -> None:
        """Queue the step's copies; each layer's attention in the next forward waits for
        that layer's (see the module's docstring)."""
        if not copies:
            return
        queue_start = time.perf_counter()
        self.wait_for_copies()  # an earlier run's with no forward since (none in the engine)
        engine = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        ready: list[torch.cuda.Event | None] = [None] * self.num_layers
        saved_before, saved = self._saved, None
        if copies.offloads:
            with self._out.active():
                if engine is not None:
                    self._out.stream.wait_stream(engine)
                ready, saved = self._offload(copies.offloads)
                self._saved = saved
        if copies.onloads:
            with self._in.active():
                if engine is not None:
                    self._in.stream.wait_stream(engine)
                # slots that earlier steps' offloads wrote (their copies may still run: the
                # engine stream waited only for their gathers) ...
                self._in.wait(saved_before)
                if {slot for _, slot in copies.offloads} & {slot for slot, _ in copies.onloads}:
                    self._in.wait(saved)  # ... or that this step's writes
                ready = self._load(copies.onloads, ready)
        self._pending = dict(enumerate(ready))
        self._install_hooks()
        # host time to queue them: ~1 ms when nothing in here waits for the GPU (metric)
        self.last_queue_seconds = time.perf_counter() - queue_start

    def wait_for_copies(self) -> None:
        """The engine stream waits for every pending layer; the pre-hooks come off. Called
        after the forward is queued (a no-op if its layers waited already) and before a
        forward that runs no hooks (a CUDA graph's replay)."""
        for layer in list(self._pending):
            self._wait_layer(layer)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def synchronize(self) -> None:
        """Block the host until every queued copy is done."""
        for lane in (self._out, self._in):
            if lane.stream is not None:
                lane.stream.synchronize()
        self._pending.clear()
        self.wait_for_copies()  # only removes the hooks now

    def close(self) -> None:
        """Let the pinned slots go (idempotent; the engine's shutdown): the queued copies end
        first. The slots stay usable as pageable memory, whose copies block the host."""
        if self._memory is not None:
            self.synchronize()
            self._memory.close()

    def last_load_seconds(self) -> float | None:
        """GPU time of the latest step's loads, from its first copy to its last scatter
        (waits for the same step's offload gathers included); None on CPU or before any."""
        return self._in.seconds()

    def last_offload_seconds(self) -> float | None:
        """GPU time of the latest step's offload (gathers and device-to-host copies)."""
        return self._out.seconds()

    def _offload_chunks(self, num: int) -> list[tuple[int, int, int, int]]:
        """(first layer, last layer, first entry, last entry) pieces of `num` blocks that fit
        the staging buffer: all blocks and as many layers as fit, else one layer at a time."""
        if num <= self.staging_blocks:
            step = min(self.num_layers, self.staging_blocks // num)
            return [(lo, min(lo + step, self.num_layers), 0, num) for lo in range(0, self.num_layers, step)]
        step = self.staging_blocks
        return [
            (layer, layer + 1, lo, min(lo + step, num))
            for layer in range(self.num_layers)
            for lo in range(0, num, step)
        ]

    def _offload(self, pairs: list[tuple[int, int]]) -> tuple[list, torch.cuda.Event | None]:
        """(GPU block, slot) pairs: gather, copy out. Returns per layer the event after its
        last gather (its blocks may be overwritten then), and the event after the last copy."""
        lane, non_blocking = self._out, self._out.stream is not None
        self.num_offloaded_blocks += len(pairs)
        pairs = sorted(pairs, key=lambda pair: pair[1])
        block_ids = host_to_device([block for block, _ in pairs], torch.int64, self.device)
        runs = slot_runs([slot for _, slot in pairs])
        gathered: list[torch.cuda.Event | None] = [None] * self.num_layers
        start = lane.record(enable_timing=True)
        for lo, hi, first, last in self._offload_chunks(len(pairs)):
            staged = lane.words.view(-1)[: (hi - lo) * (last - first) * lane.words[0].numel()]
            staged = staged.view(hi - lo, last - first, *lane.words.shape[1:])
            # [layers, blocks, 2, bs, H, D]: the cache viewed block-major per layer
            source = self._cache[lo:hi].transpose(1, 2)
            torch.index_select(source, 1, block_ids[first:last], out=staged)
            gathered[lo:hi] = [lane.record()] * (hi - lo)
            for index, slot, length in _clip(runs, first, last):
                for layer in range(lo, hi):
                    self._slots[layer, slot : slot + length].copy_(
                        staged[layer - lo, index : index + length], non_blocking=non_blocking
                    )
                    self.num_offload_copies += 1
        end = lane.record(enable_timing=True)
        lane.timing = (start, end) if start is not None else None
        return gathered, end

    def _load(self, pairs: list[tuple[int, int]], gathered: list) -> list:
        """(slot, GPU block) pairs, layer by layer: copy in, then (after the offload's gather
        of the layer) scatter. Returns per layer the event after its scatter."""
        lane, non_blocking = self._in, self._in.stream is not None
        self.num_loaded_blocks += len(pairs)
        pairs = sorted(pairs)
        block_ids = host_to_device([block for _, block in pairs], torch.int64, self.device)
        runs = slot_runs([slot for slot, _ in pairs])
        num, step = len(pairs), self.staging_blocks
        loaded: list[torch.cuda.Event | None] = []
        start = lane.record(enable_timing=True)
        for layer in range(self.num_layers):
            for first in range(0, num, step):
                last = min(first + step, num)
                staged = lane.words[: last - first]
                for index, slot, length in _clip(runs, first, last):
                    staged[index : index + length].copy_(
                        self._slots[layer, slot : slot + length], non_blocking=non_blocking
                    )
                    self.num_load_copies += 1
                if first == 0:
                    lane.wait(gathered[layer])  # the blocks' evicted contents are saved
                # cache[layer] is [2, blocks, bs, H, D]; staged [n, 2, bs, H, D]
                self._cache[layer].index_copy_(1, block_ids[first:last], staged.transpose(0, 1))
            loaded.append(lane.record())
        lane.timing = (start, lane.record(enable_timing=True)) if start is not None else None
        return loaded

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
        """The engine stream waits for `layer`'s pending copies; False if none were pending."""
        if layer not in self._pending:
            return False
        event = self._pending.pop(layer)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return True
