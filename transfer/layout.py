"""The KV cache layout both sides of a transfer must agree on.

A packed KV buffer is raw bytes shaped `[num_layers, 2, n_blocks, block_size,
num_kv_heads, head_dim]` in `dtype`. The receiver only knows how to read those
bytes if its cache has the same layout, so every handle and every wire header
carries the layout (and a fingerprint of it); a mismatch is refused with a
message naming each differing field, never silently reinterpreted.

Tensor parallelism: a worker of `tp_size` ranks holds each rank's slice of the KV heads,
but a transfer's layout names the heads `[kv_head_start, kv_head_start + num_kv_heads)`
whole (every head: over gRPC rank 0 gathers and scatters them over the worker's own group,
engine/kv_heads.py; over nccl each rank sends or receives its share rank to rank,
transfer/nccl_direct.py, and the bytes counted are still the whole heads'). `tp_size` is
in the layout and its fingerprint, so each side names the other's; two sides may differ in
it (a prefill worker with TP 2 feeds one with TP 1), as long as both split the heads evenly
(`check_tp_pair`), never in the heads they carry.

This module imports no torch at load time, so the router can build and compare
layouts without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Number of dims of the engine's KV cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].
KV_CACHE_NDIM = 6


class KVLayoutMismatch(ValueError):
    """Two KV layouts differ; the message names every differing field with both values."""


# Element sizes of the KV cache dtypes (engine/config.py DTYPES), by torch's names.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def normalize_dtype_name(dtype: Any) -> str:
    """`torch.bfloat16`, `"torch.bfloat16"` and `"bfloat16"` all become `"bfloat16"`."""
    name = str(dtype)
    return name.removeprefix("torch.")


# Fields added with tensor parallelism, left out of the fingerprint at these values.
_FINGERPRINT_DEFAULTS = {"tp_size": 1, "kv_head_start": 0}


@dataclass(frozen=True)
class KVLayout:
    model_name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    tp_size: int = 1  # ranks of the worker this layout is of (its TP size)
    kv_head_start: int = 0  # the first of the model's KV heads a buffer carries

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.kv_head_start, int) or self.kv_head_start < 0:
            raise ValueError(f"KVLayout.kv_head_start must be an int >= 0, got {self.kv_head_start!r}")

    @classmethod
    def from_cache(
        cls, kv_cache: torch.Tensor, model_name: str, tp_size: int = 1, num_kv_heads: int | None = None
    ) -> KVLayout:
        """Read the layout off a cache tensor `[num_layers, 2, num_blocks, block_size, Hkv, D]`;
        a tensor-parallel worker's rank-0 cache holds a slice of the heads its transfers carry:
        give `tp_size` and the model's `num_kv_heads` (the whole heads, from 0)."""
        if kv_cache.dim() != KV_CACHE_NDIM or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        heads = num_kv_heads
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(
            model_name=model_name,
            dtype=normalize_dtype_name(kv_cache.dtype),
            num_layers=int(num_layers),
            num_kv_heads=int(num_kv_heads if heads is None else heads),
            head_dim=int(head_dim),
            block_size=int(block_size),
            tp_size=tp_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable hex digest of every field (same value in every process and Python version).
        `tp_size` and `kv_head_start` enter only when not 1 and 0: a single-rank worker's
        fingerprint is the one workers of earlier versions compute."""
        fields = self.to_dict()
        for name, default in _FINGERPRINT_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]

    def buffer_bytes(self, n_blocks: int) -> int:
        """Bytes of a packed buffer holding `n_blocks` blocks (no torch: the router counts them)."""
        return math.prod(self.buffer_shape(n_blocks)) * DTYPE_BYTES[self.dtype]

    def buffer_shape(self, n_blocks: int) -> tuple[int, int, int, int, int, int]:
        """Shape of a packed buffer holding `n_blocks` blocks: [num_layers, 2, n, block_size, Hkv, D]."""
        return (self.num_layers, 2, n_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def differences(
        self, other: KVLayout, self_label: str = "prefill", other_label: str = "decode"
    ) -> list[str]:
        """One line per differing field, e.g. `"block_size: prefill 16 != decode 32"` (the TP
        sizes may differ: the buffer between them carries whole heads; `check_compatible`)."""
        lines = []
        for field in dataclasses.fields(self):
            if field.name == "tp_size":
                continue
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                lines.append(f"{field.name}: {self_label} {mine!r} != {other_label} {theirs!r}")
        return lines

    def check_compatible(
        self, other: KVLayout, self_label: str = "prefill", other_label: str = "decode"
    ) -> None:
        """Raise `KVLayoutMismatch` naming every field that differs between `self` and `other`."""
        lines = self.differences(other, self_label, other_label)
        if not lines and self.num_kv_heads == other.num_kv_heads:
            try:
                check_tp_pair(self.num_kv_heads, self.tp_size, other.tp_size, self_label, other_label)
            except ValueError as exc:
                lines.append(str(exc))
        if lines:
            raise KVLayoutMismatch("KV cache layout mismatch: " + "; ".join(lines))


def check_tp_pair(
    num_kv_heads: int, prefill_size: int, decode_size: int, prefill: str = "prefill", decode: str = "decode"
) -> None:
    """Raise ValueError naming both sizes if KV cannot move between a worker of `prefill_size`
    ranks and one of `decode_size` ranks: each side's ranks must split the model's
    `num_kv_heads` evenly, or each keep a replica of one (a size that is a multiple of them)."""
    bad = [
        f"{label} {size}"
        for label, size in ((prefill, prefill_size), (decode, decode_size))
        if num_kv_heads % size and size % num_kv_heads
    ]
    if bad:
        raise ValueError(
            f"tensor_parallel_size: {prefill} {prefill_size} / {decode} {decode_size}: the model's "
            f"{num_kv_heads} KV heads cannot be split over {' nor '.join(bad)} ranks (a size must "
            "divide the KV heads or be a multiple of them)"
        )
