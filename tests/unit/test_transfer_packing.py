"""Packing, byte round trips, layouts and handles (CPU, in-process); layer-chunked transfers.

The Triton kernel is checked bit for bit under Triton's CPU interpreter in a subprocess
(TRITON_INTERPRET must be set before triton is imported).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.transfer import nccl_backend
from pdserve.transfer.contract import KVArrival, KVHandle, check_send_args
from pdserve.transfer.credentials import KVAuthError, KVGate, auth_tag
from pdserve.transfer.layout import KVLayout, KVLayoutMismatch
from pdserve.transfer.nccl_backend import NcclKVReceiver, NcclTransferNotice, default_chunk_layers
from pdserve.transfer.packing import (
    buffer_nbytes,
    from_bytes,
    layer_chunks,
    pack_blocks,
    to_bytes,
    unpack_blocks,
    unpack_into,
)
from pdserve.transfer.peers import NcclPeer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_cache(num_blocks: int = 10, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    # [num_layers=3, 2, num_blocks, block_size=4, Hkv=2, D=8]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, num_blocks, 4, 2, 8, generator=generator).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bitwise view, so comparisons are exact for every dtype (and NaN-safe)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_then_unpack_moves_blocks_bit_exact(dtype: torch.dtype) -> None:
    src = make_cache(dtype=dtype, seed=1)
    dst = torch.zeros(3, 2, 12, 4, 2, 8, dtype=dtype)
    src_ids, dst_ids = [7, 2, 5], [0, 11, 3]
    buffer = pack_blocks(src, src_ids)
    assert buffer.shape == (3, 2, 3, 4, 2, 8) and buffer.is_contiguous()
    unpack_blocks(dst, buffer, dst_ids)
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(bits(dst[:, :, d]), bits(src[:, :, s]))
    untouched = [b for b in range(12) if b not in dst_ids]
    assert torch.count_nonzero(dst[:, :, untouched].float()) == 0


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_pack_unpack_property(data: st.DataObject) -> None:
    num_blocks = data.draw(st.integers(1, 9))
    n = data.draw(st.integers(1, num_blocks))
    src_ids = data.draw(st.lists(st.integers(0, num_blocks - 1), min_size=n, max_size=n))
    dst_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    src = make_cache(num_blocks, seed=n)
    dst = torch.zeros_like(src)
    unpack_blocks(dst, pack_blocks(src, src_ids), dst_ids)
    expected = src.index_select(2, torch.tensor(src_ids))
    assert torch.equal(dst.index_select(2, torch.tensor(dst_ids)), expected)


def test_pack_into_pooled_buffer() -> None:
    src = make_cache()
    pooled = torch.empty(3, 2, 2, 4, 2, 8)
    out = pack_blocks(src, [4, 1], out=pooled)
    assert out.data_ptr() == pooled.data_ptr()
    assert torch.equal(pooled, src[:, :, [4, 1]])
    with pytest.raises(ValueError, match="shape"):
        pack_blocks(src, [4, 1, 2], out=pooled)


def test_bad_inputs_raise_clear_errors() -> None:
    cache = make_cache(num_blocks=5)
    with pytest.raises(ValueError, match="block id 5 out of range for a cache of 5 blocks"):
        pack_blocks(cache, [0, 5])
    with pytest.raises(ValueError, match="block id -1 out of range"):
        pack_blocks(cache, [-1])
    with pytest.raises(ValueError, match="empty"):
        pack_blocks(cache, [])
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        pack_blocks(cache[0], [0])
    buffer = pack_blocks(cache, [0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        unpack_blocks(cache, buffer, [3, 3])
    with pytest.raises(ValueError, match=r"shape .* does not match"):
        unpack_blocks(cache, buffer, [3])
    with pytest.raises(ValueError, match="dtype"):
        unpack_blocks(cache, buffer.to(torch.bfloat16), [3, 4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_round_trip(dtype: torch.dtype) -> None:
    tensor = pack_blocks(make_cache(dtype=dtype, seed=3), [1, 3])
    payload = to_bytes(tensor)
    assert payload.nbytes == tensor.numel() * tensor.element_size()
    # writable source shares memory; read-only bytes are copied once
    shared = from_bytes(bytearray(payload), str(dtype), tensor.shape)
    copied = from_bytes(bytes(payload), dtype, tensor.shape)
    for back in (shared, copied):
        assert back.dtype == dtype and back.shape == tensor.shape
        assert torch.equal(bits(back), bits(tensor))
    with pytest.raises(ValueError, match="needs"):
        from_bytes(bytes(payload)[:-2], dtype, tensor.shape)
    with pytest.raises(ValueError, match="contiguous"):
        to_bytes(tensor.transpose(0, 1))


def test_buffer_nbytes_matches_packed_tensor() -> None:
    cache = make_cache(dtype=torch.bfloat16)
    layout = KVLayout.from_cache(cache, "tiny")
    packed = pack_blocks(cache, [0, 1, 2, 3])
    assert buffer_nbytes(layout, 4) == packed.numel() * packed.element_size() == 3 * 2 * 4 * 4 * 2 * 8 * 2


def test_unpack_into_callback_scatters_then_signals() -> None:
    src, dst = make_cache(seed=5), torch.zeros(3, 2, 10, 4, 2, 8)
    ready: list[str] = []
    sink = unpack_into(dst, ready.append)
    sink.on_kv_chunk(KVArrival("req-1", (9, 8), 11, 0.0), slice(0, 3), pack_blocks(src, [0, 1]))
    assert ready == ["req-1"]
    assert torch.equal(dst[:, :, [9, 8]], src[:, :, [0, 1]])


def test_layout_fingerprint_is_stable_and_field_sensitive() -> None:
    layout = KVLayout("llama-3-8b", "torch.bfloat16", 32, 8, 128, 16)
    assert layout.dtype == "bfloat16"
    same = KVLayout("llama-3-8b", "bfloat16", 32, 8, 128, 16)
    assert layout.fingerprint() == same.fingerprint()
    # Pinned value: a change here breaks prefill/decode workers of different versions.
    assert layout.fingerprint() == "c48da67c4f12a5070a192ffa23db9067"
    assert len(layout.fingerprint()) == 32 and int(layout.fingerprint(), 16) >= 0
    other = KVLayout("llama-3-8b", "bfloat16", 32, 8, 128, 32)
    assert layout.fingerprint() != other.fingerprint()


def test_layout_mismatch_names_every_field() -> None:
    prefill = KVLayout("m", "bfloat16", 32, 8, 128, 16)
    decode = KVLayout("m", "float16", 32, 8, 64, 32)
    with pytest.raises(KVLayoutMismatch) as info:
        prefill.check_compatible(decode)
    message = str(info.value)
    assert "block_size: prefill 16 != decode 32" in message
    assert "head_dim: prefill 128 != decode 64" in message
    assert "dtype: prefill 'bfloat16' != decode 'float16'" in message
    assert "num_layers" not in message
    prefill.check_compatible(KVLayout("m", "bfloat16", 32, 8, 128, 16))
    with pytest.raises(ValueError, match="positive"):
        KVLayout("m", "bfloat16", 0, 8, 128, 16)


def test_layout_from_cache() -> None:
    layout = KVLayout.from_cache(make_cache(dtype=torch.bfloat16), "tiny")
    assert layout == KVLayout("tiny", "bfloat16", num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)


def test_handle_is_plain_picklable_data_and_checks_args() -> None:
    layout = KVLayout("tiny", "float32", 3, 2, 8, 4)
    handle = KVHandle("req-1", "decode-0", [4, 5], 7, layout, NcclPeer(1))
    assert handle.layout_fingerprint == layout.fingerprint()
    assert pickle.loads(pickle.dumps(handle)) == handle
    with pytest.raises(KVLayoutMismatch, match="fingerprint"):
        KVHandle("req-1", "decode-0", [4], 3, layout, NcclPeer(1), layout_fingerprint="0" * 32)
    with pytest.raises(ValueError, match="give the decode worker's peer descriptor"):
        KVHandle("req-1", "decode-0", [4], 3, layout, None)
    with pytest.raises(ValueError, match="1 source blocks but the handle asks for 2"):
        check_send_args(handle, [0], layout)
    with pytest.raises(KVLayoutMismatch, match="block_size: prefill 8 != decode 4"):
        check_send_args(handle, [0, 1], KVLayout("tiny", "float32", 3, 2, 8, 8))


def test_layer_ranges_pack_and_unpack_only_those_layers() -> None:
    src, dst = make_cache(seed=7), torch.zeros(3, 2, 10, 4, 2, 8)
    src_ids, dst_ids = [6, 0, 3], [1, 9, 2]
    full = pack_blocks(src, src_ids)  # [3, 2, 3, 4, 2, 8]
    pooled = torch.empty_like(full)
    for layers in layer_chunks(3, 2):  # [0:2], [2:3]
        part = pack_blocks(src, src_ids, out=pooled[layers], layers=layers)
        assert part.shape == (layers.stop - layers.start, 2, 3, 4, 2, 8)
        assert part.data_ptr() == pooled[layers].data_ptr()
        unpack_blocks(dst, part, dst_ids, layers=layers)
        assert torch.count_nonzero(dst[layers.stop :]) == 0  # later layers not written yet
    assert torch.equal(bits(pooled), bits(full))
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    assert torch.equal(pack_blocks(src, [5], layers=slice(-1, None)), src[2:, :, [5]])
    with pytest.raises(ValueError, match="non-empty step-1 slice"):
        pack_blocks(src, [0], layers=slice(2, 2))
    with pytest.raises(ValueError, match=r"shape .* does not match"):
        unpack_blocks(dst, full, dst_ids, layers=slice(0, 1))


def test_layer_chunks_and_default_chunking() -> None:
    assert layer_chunks(32, 8) == [slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 32)]
    assert layer_chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert layer_chunks(4, 0) == layer_chunks(4, 4) == layer_chunks(4, 9) == [slice(0, 4)]
    # Llama-3-8B, 128 blocks of 16 tokens: 8 MiB per layer -> 4 layers (32 MiB) per chunk.
    assert default_chunk_layers(32, 2 * 128 * 16 * 8 * 128 * 2) == 4
    assert default_chunk_layers(32, 1 << 20) == 0  # a small request goes in one chunk


class _FilledWork:
    """A completed `dist.Work` stand-in."""

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return True


def test_receiver_hands_chunks_over_in_order_and_drains_after_a_failing_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = make_cache(seed=11)
    sent = pack_blocks(src, [2, 8, 4])  # [3, 2, 3, 4, 2, 8]: what the sender would ship
    posted: list[slice] = []

    def fake_irecv(view: torch.Tensor, src: int, group: object = None) -> _FilledWork:
        start = sum(chunk.stop - chunk.start for chunk in posted)
        posted.append(slice(start, start + view.shape[0]))
        view.copy_(sent[posted[-1]])
        return _FilledWork()

    monkeypatch.setattr(nccl_backend.dist, "irecv", fake_irecv)
    layout = KVLayout.from_cache(src, "tiny")
    gate = KVGate("packing-tests-secret")

    def reserved_notice() -> NcclTransferNotice:  # a fresh reservation of blocks 0, 5, 7 for "r1"
        credential = gate.issue("r1", [0, 5, 7], sent.numel() * 4)
        return NcclTransferNotice("r1", 1, (0, 5, 7), tuple(sent.shape), "float32", layout,
                                  sent.numel() * 4, 4242, chunk_layers=2, credential=credential,
                                  auth_tag=auth_tag("packing-tests-secret", "r1", credential))  # fmt: skip

    notice = reserved_notice()
    dst, ready, seen = torch.zeros_like(src), [], []
    unpack_chunk = unpack_into(dst, ready.append)
    arrivals: list[KVArrival] = []

    class Sink:
        def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
            seen.append((layers, int(torch.count_nonzero(dst[layers]))))  # nothing there before its unpack
            arrivals.append(arrival)
            unpack_chunk.on_kv_chunk(arrival, layers, chunk)

    before = time.perf_counter()
    receiver = NcclKVReceiver(Sink(), layout, "cpu", gate)
    receiver.recv(notice)
    assert posted == [slice(0, 2), slice(2, 3)] and seen == [(slice(0, 2), 0), (slice(2, 3), 0)]
    # chunk by chunk only: no extra whole-buffer delivery (layers 0..3) at the end
    assert ready == ["r1"] and slice(0, 3) not in [layers for layers, _ in seen]
    assert torch.equal(dst[:, :, [0, 5, 7]], src[:, :, [2, 8, 4]])
    # one arrival for the request, the notice's first token on it, stamped when recv began
    assert arrivals[0] is arrivals[1] and arrivals[0].first_token_id == 4242
    assert arrivals[0].req_id == "r1" and arrivals[0].block_ids == (0, 5, 7)
    assert before <= arrivals[0].started_at <= time.perf_counter()

    class Failing:
        def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
            raise KeyError(f"no reservation for {arrival.req_id}")

    posted.clear()
    receiver = NcclKVReceiver(Failing(), layout, "cpu", gate)
    posted.clear()
    with pytest.raises(KVAuthError, match="no open reservation"):  # a replay: drained, refused
        receiver.recv(notice)
    assert posted == [slice(0, 2), slice(2, 3)]
    posted.clear()
    with pytest.raises(KeyError, match="no reservation"):
        receiver.recv(reserved_notice())
    assert posted == [slice(0, 2), slice(2, 3)]  # every chunk still received: the pair stays in step
    # A notice naming other blocks than its reservation's: drained, refused, nothing written.
    posted.clear()
    dst.zero_()
    elsewhere = dataclasses.replace(reserved_notice(), block_ids=(1, 5, 7))
    receiver = NcclKVReceiver(Sink(), layout, "cpu", gate)
    with pytest.raises(nccl_backend.KVTransferError, match="not the 3 blocks"):
        receiver.recv(elsewhere)
    assert posted == [slice(0, 2), slice(2, 3)] and torch.count_nonzero(dst) == 0
    bad = NcclTransferNotice("r2", 1, (0,), (3, 2, 1, 4, 2, 8), "float32", layout, 3 * 2 * 128 * 4, 0, -1)
    with pytest.raises(nccl_backend.KVTransferError, match="could not drain"):
        receiver.recv(bad)


def test_gloo_worlds_bit_exact_with_one_layer_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2- and 3-process gloo tests, every request split into 1-layer chunks (2 per request)."""
    from tests.unit import test_transfer_nccl

    monkeypatch.setenv(nccl_backend.CHUNK_LAYERS_ENV, "1")  # inherited by the spawned senders
    test_transfer_nccl.test_two_processes_float32_and_bfloat16_bit_exact_with_refusal_and_timeout()
    test_transfer_nccl.test_two_senders_one_receiver_bit_exact()


TRITON_CHECK = """
import torch
from pdserve.transfer import triton_packing
from pdserve.transfer.packing import pack_blocks

# 64-byte chunks: several per block, the last one masked (a block is 3*2*8 elements, moved
# as int64 words); the 3-wide float16 shape moves 2-byte words.
triton_packing.MAX_CHUNK_BYTES = 64
for dtype, head_dim in ((torch.float32, 8), (torch.bfloat16, 8), (torch.float16, 8), (torch.float16, 3)):
    src = torch.randn(3, 2, 9, 3, 2, head_dim).to(dtype)
    src.view(-1)[5] = float("nan")
    ints = lambda t: t.contiguous().view(-1).view(torch.uint8)
    ids = torch.tensor([7, 2, 5, 2, 0])  # gather may repeat ids
    for layers in (slice(0, 3), slice(1, 3), slice(0, 1)):
        out = torch.empty(layers.stop - layers.start, 2, 5, 3, 2, head_dim, dtype=dtype)
        triton_packing.gather_blocks(src[layers], ids, out)
        assert torch.equal(ints(out), ints(pack_blocks(src, ids.tolist(), layers=layers))), (dtype, layers)
        dst = torch.zeros(3, 2, 9, 3, 2, head_dim, dtype=dtype)
        dst_ids = torch.tensor([8, 0, 3, 4, 6], dtype=torch.int32)
        triton_packing.scatter_blocks(dst[layers], out, dst_ids)
        expected = torch.zeros_like(dst)
        expected[layers].index_copy_(2, dst_ids.long(), out)
        assert torch.equal(ints(dst), ints(expected)), (dtype, layers)
print("triton packing ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_bit_exact_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(TRITON_CHECK)], env=env, cwd=repo_root,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton packing ok" in result.stdout
