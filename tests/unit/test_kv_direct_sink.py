"""A decode worker as the sink of rank-to-rank KV (transfer/nccl_direct.py `KVDirectSink`): the
ranks write its reserved blocks themselves between `begin_kv_write` and `end_kv_write`. No Ray,
a real tiny decode worker (its grpc receive side issues the reservations).

An abort while the ranks write frees nothing under them: the blocks are freed when the write
ends, and the request does not start. A write that lands starts the request from the
prefill's first token; one that failed leaves the reservation for `kv_failed` to end. A request
unknown to the worker is refused; one aborted before its write began is dropped (None)."""

from __future__ import annotations

import time

import pytest

from pdserve.deploy.wiring import WorkerSpec, build_worker
from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.contract import KVArrival

pytestmark = pytest.mark.timeout(120)

PROMPT = list(range(1, 41))  # 40 tokens: 3 blocks of 16


@pytest.fixture
def worker():
    transfer = TransferConfig(backend="grpc", host="127.0.0.1").with_secret()
    spec = WorkerSpec("decode-0", "decode", EngineConfig(model="tiny", num_gpu_blocks=64), transfer)
    built = build_worker(spec)
    built.ready()
    yield built
    built.shutdown()


def reserve(worker, req_id: str) -> KVArrival:
    handle = worker.reserve(req_id, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    return KVArrival(req_id, tuple(handle.block_ids), 7, time.perf_counter())


def free_blocks(worker) -> int:
    return worker.load().num_free_blocks


def outputs_until_finished(worker, req_id: str, timeout_s: float = 30.0) -> list:
    outs, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outs += [o for o in worker.poll(0.2).outputs if o.req_id == req_id]
        if any(o.finished for o in outs):
            return outs
    raise AssertionError(f"{req_id} did not finish: {outs}")


def test_an_abort_under_the_write_frees_the_blocks_when_the_write_ends(worker):
    total = worker.load().num_total_blocks
    arrival = reserve(worker, "r1")
    held = free_blocks(worker)
    assert held < total
    assert worker.begin_kv_write(arrival) == arrival.block_ids
    assert worker.abort("r1")
    assert free_blocks(worker) == held  # the ranks may still be writing them
    worker.end_kv_write(arrival, landed=True)  # aborted meanwhile: freed now, never started
    assert free_blocks(worker) == total
    assert not worker.engine.has_unfinished()


def test_a_landed_write_starts_the_request_and_a_failed_one_waits_for_kv_failed(worker):
    total = worker.load().num_total_blocks
    arrival = reserve(worker, "r1")
    assert worker.begin_kv_write(arrival) == arrival.block_ids
    worker.end_kv_write(arrival, landed=True)
    outs = outputs_until_finished(worker, "r1")
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == 3 and outs[-1].finish_reason == "length"  # the first (7) came with the KV

    arrival = reserve(worker, "r2")
    worker.begin_kv_write(arrival)
    worker.end_kv_write(arrival, landed=False)
    assert worker.engine.is_waiting_for_remote_kv("r2")  # still reserved: the sender reports
    worker.kv_failed("r2", "KVTransferError: a rank's receive failed")
    out = outputs_until_finished(worker, "r2")[-1]
    assert out.finish_reason == "abort" and out.error == "KVTransferError: a rank's receive failed"
    deadline = time.monotonic() + 10
    while free_blocks(worker) != total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_blocks(worker) == total


def test_unknown_and_dropped_requests(worker):
    with pytest.raises(KeyError, match="no reservation for nobody"):
        worker.begin_kv_write(KVArrival("nobody", (1, 2), 7, 0.0))
    arrival = reserve(worker, "r1")
    with pytest.raises(ValueError, match="other blocks than the 3 reserved"):
        worker.begin_kv_write(KVArrival("r1", tuple(reversed(arrival.block_ids)), 7, 0.0))
    assert worker.abort("r1")  # before its write began: its bytes are dropped, not refused
    assert worker.begin_kv_write(arrival) is None
