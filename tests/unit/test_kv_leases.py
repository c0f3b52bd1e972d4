"""Transfer leases (`transfer.timeout_s`): a KV transfer that does not complete in time frees the
blocks on both sides and ends its request with a status naming the timeout; nothing waits forever.

A real in-process deployment with a 2 s transfer timeout. The test hook is the prefill worker's
real gRPC sender with its in-band stream stalled after the header (a sender that stops sending),
and a reservation whose sender never comes at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from pdserve.engine import SamplingParams
from pdserve.router.client import PdserveClient, PdserveError
from tests.inprocess import InProcessDeployment
from tests.unit.grpc_kv import auth_metadata
from tests.unit.test_kv_outsider import Outsider
from tests.unit.test_router_inprocess import collect, prompts_with_shared_prefixes, wait_all_free

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def dep() -> Iterator[InProcessDeployment]:
    d = InProcessDeployment(num_prefill=1, num_decode=1, transfer_options={"timeout_s": TIMEOUT_S})
    yield d
    d.close()


def test_a_stalled_transfer_frees_both_sides_and_fails_with_the_timeout(
    dep: InProcessDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt, other = prompts_with_shared_prefixes(2, seed=21)
    sender = dep.prefill["prefill-0"].send_side.sender
    stall = threading.Event()

    def stalled_chunks(header: bytes, payload: memoryview) -> Iterator[bytes]:
        yield header  # the receiver admits the call and reads the header ...
        stall.wait(60)  # ... then no byte follows (the hook: a sender that stops sending)

    with PdserveClient(dep.url) as client:
        expected = collect(client, prompt, 8)[0]  # the same prompt, unhindered
        monkeypatch.setattr(sender, "_chunks", stalled_chunks)
        start = time.monotonic()
        with pytest.raises(PdserveError) as info:
            collect(client, other, 8)
        took_s = time.monotonic() - start
        stall.set()
        assert info.value.code in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
        assert "timed out" in str(info.value) and "transfer.timeout_s" in str(info.value), str(info.value)
        assert took_s < TIMEOUT_S + 5, f"the request ended {took_s:.1f} s after it began"
        events = [e.message for e in dep.core.lifecycle.since(0)]
        assert any("failed" in m and "timed out" in m for m in events), events  # logged once
        wait_all_free(dep, timeout=5)  # blocks freed on the prefill and on the decode side
        assert len(dep.decode["decode-0"].receive_side.gate) == 0  # no credential left open
        monkeypatch.undo()
        assert collect(client, prompt, 8)[0] == expected  # a new request then succeeds, exact


def test_a_reservation_whose_sender_never_comes_expires(dep: InProcessDeployment) -> None:
    decode = dep.decode["decode-0"]
    prompt = prompts_with_shared_prefixes(1, seed=22)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    free_before = decode.load().num_free_blocks
    handle = decode.reserve("orphan", prompt, params)
    assert handle is not None and decode.load().num_free_blocks < free_before
    start = time.monotonic()
    while decode.engine.is_waiting_for_remote_kv("orphan"):
        assert time.monotonic() - start < TIMEOUT_S + 3, "the reservation outlived its lease"
        time.sleep(0.05)
    assert time.monotonic() - start >= TIMEOUT_S - 0.5
    wait_all_free(dep, timeout=5)
    # Its credential went with it: a sender arriving late is refused and writes nothing.
    server = decode.receive_side.server
    late = Outsider(server.address, server.data_port, decode.layout)
    genuine = auth_metadata("orphan", handle.credential, secret=dep.transfer.secret)
    late.forge("orphan", list(handle.block_ids), metadata=genuine)
    late.channel.close()
    assert late.codes == [grpc.StatusCode.PERMISSION_DENIED]
