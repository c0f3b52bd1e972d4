"""The KV cache layout both sides of a transfer must agree on.

A packed KV buffer is raw bytes shaped `[num_layers, 2, n_blocks, block_size,
num_kv_heads, head_dim]` in `dtype`. The receiver only knows how to read those
bytes if its cache has the same layout, so every handle and every wire header
carries the layout (and a fingerprint of it); a mismatch is refused with a
message naming each differing field, never silently reinterpreted.

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


@dataclass(frozen=True)
class KVLayout:
    model_name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")

    @classmethod
    def from_cache(cls, kv_cache: torch.Tensor, model_name: str) -> KVLayout:
        """Read the layout off a cache tensor `[num_layers, 2, num_blocks, block_size, Hkv, D]`."""
        if kv_cache.dim() != KV_CACHE_NDIM or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(
            model_name=model_name,
            dtype=normalize_dtype_name(kv_cache.dtype),
            num_layers=int(num_layers),
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            block_size=int(block_size),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable hex digest of every field (same value in every process and Python version)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
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
        """One line per differing field, e.g. `"block_size: prefill 16 != decode 32"`."""
        lines = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                lines.append(f"{field.name}: {self_label} {mine!r} != {other_label} {theirs!r}")
        return lines

    def check_compatible(
        self, other: KVLayout, self_label: str = "prefill", other_label: str = "decode"
    ) -> None:
        """Raise `KVLayoutMismatch` naming every field that differs between `self` and `other`."""
        lines = self.differences(other, self_label, other_label)
        if lines:
            raise KVLayoutMismatch("KV cache layout mismatch: " + "; ".join(lines))
