"""Attention backends over the paged KV cache.

`reference` (plain torch, any device) is the oracle; `triton` is the fast GPU
path. `get_backend("auto")` picks triton on CUDA when it imports, else reference.
"""

from __future__ import annotations

from pdserve.engine.attention.metadata import AttentionMetadata, write_kv
from pdserve.engine.attention.reference import ReferenceAttention


def get_backend(name: str, device: str):
    """Return an attention backend instance by name ("auto", "reference", "triton")."""
    if name == "reference":
        return ReferenceAttention()
    if name in ("auto", "triton"):
        if str(device).startswith("cuda"):
            try:
                from pdserve.engine.attention.triton_backend import TritonAttention
            except ImportError:
                if name == "triton":
                    raise
                return ReferenceAttention()
            return TritonAttention()
        if name == "triton":
            raise ValueError("attention backend 'triton' needs a CUDA device")
        return ReferenceAttention()
    raise ValueError(f"unknown attention backend {name!r} (choose auto, reference or triton)")


__all__ = ["AttentionMetadata", "ReferenceAttention", "get_backend", "write_kv"]
