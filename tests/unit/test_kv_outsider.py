"""An outsider on 127.0.0.1 attacks a decode worker's KV service while real streams run.

A real in-process deployment (router, prefill and decode workers, gRPC KV transfer); the
outsider talks to the decode worker's KV server and data port directly, as anyone on the host
could: forged pushes for an unknown request, for live requests' ids (taken from the public
API's own stream), a replayed credential, headers announcing 512 GiB and 256 MiB, four idle
push streams and four idle data connections. Every forgery must be refused
(UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT, never a crash status), no cache
block may change, the process must not grow, and the real streams must come out exact and
on time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from pdserve.engine import SamplingParams
from pdserve.internal import kv_transfer_pb2
from pdserve.router.client import GenerateChunk, PdserveClient
from pdserve.transfer.grpc_backend import layout_to_proto
from pdserve.transfer.layout import KVLayout
from tests.inprocess import InProcessDeployment
from tests.unit.grpc_kv import auth_metadata
from tests.unit.test_router_inprocess import collect, prompts_with_shared_prefixes

REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
MAX_TOKENS = 8


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def header_chunk(layout: KVLayout, req_id: str, block_ids: list[int], total_bytes: int) -> bytes:
    header = kv_transfer_pb2.KVHeader(
        req_id=req_id, layout=layout_to_proto(layout), block_ids=block_ids, dtype=layout.dtype,
        shape=list(layout.buffer_shape(len(block_ids))), total_bytes=total_bytes, first_token_id=1,
    )  # fmt: skip
    return kv_transfer_pb2.KVChunk(header=header).SerializeToString()


class Outsider:
    """Raw PushKV calls and sockets against one KV server."""

    def __init__(self, address: str, data_port: int, layout: KVLayout) -> None:
        self.channel = grpc.insecure_channel(address)
        self.push = self.channel.stream_unary(
            "/pdserve.internal.KVTransfer/PushKV",
            response_deserializer=kv_transfer_pb2.PushKVReply.FromString,
        )
        self.data_port = data_port
        self.layout = layout
        self.codes: list[grpc.StatusCode] = []

    def forge(self, req_id: str, block_ids: list[int], total_bytes: int | None = None, metadata=()) -> None:
        """Push a header and some bytes; record the status it ended with."""
        total = total_bytes if total_bytes is not None else self.layout_bytes(len(block_ids))
        chunks = [header_chunk(self.layout, req_id, block_ids, total), b"\x12\x04junk"]
        try:
            self.push(iter(chunks), timeout=10, metadata=metadata)
            self.codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            self.codes.append(exc.code())

    def layout_bytes(self, n_blocks: int) -> int:
        numel = 1
        for size in self.layout.buffer_shape(n_blocks):
            numel *= size
        return numel * getattr(torch, self.layout.dtype).itemsize

    def idle_streams(self, count: int, release: threading.Event) -> list[grpc.Future]:
        """PushKV calls that never send a byte (until `release`)."""

        def silent() -> Iterator[bytes]:
            release.wait(60)
            return
            yield b""

        return [self.push.future(silent(), timeout=60) for _ in range(count)]

    def idle_data_connections(self, count: int) -> list[socket.socket]:
        return [socket.create_connection(("127.0.0.1", self.data_port), timeout=5) for _ in range(count)]


def run_concurrently(client: PdserveClient, prompts: list[list[int]], seen_ids: list[str]) -> list:
    """Stream every prompt at once: (tokens, seconds, kv_transfer_ms) each; request ids go to `seen_ids`
    as their first chunk arrives (what an outsider can learn from the public API)."""
    results: list = [None] * len(prompts)

    def real(i: int) -> None:
        start, tokens, kv_ms = time.monotonic(), [], -1.0
        for event in client.generate(prompts[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True):
            if isinstance(event, GenerateChunk):
                if event.request_id not in seen_ids:
                    seen_ids.append(event.request_id)
                tokens.extend(event.token_ids)
            else:
                kv_ms = event.timings.kv_transfer_ms
        results[i] = (tokens, time.monotonic() - start, kv_ms)

    streams = [threading.Thread(target=real, args=(i,)) for i in range(len(prompts))]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join(60)
    return results


@pytest.fixture(scope="module")
def dep() -> Iterator[InProcessDeployment]:
    d = InProcessDeployment(num_prefill=1, num_decode=1, policy="round_robin")
    yield d
    d.close()


def test_an_outsider_cannot_write_kv_nor_stall_real_transfers(dep: InProcessDeployment) -> None:
    decode = dep.decode["decode-0"]
    server = decode.receive_side.server
    outsider = Outsider(server.address, server.data_port, decode.layout)
    prompts = prompts_with_shared_prefixes(8, seed=11)
    with PdserveClient(dep.url) as client:
        baseline = [collect(client, prompt, MAX_TOKENS) for prompt in prompts]  # warms the prefix cache
        # the same streams at once, unhindered: what the attack phase's latencies compare with
        unhindered_s = max(took_s for _, took_s, _ in run_concurrently(client, prompts, []))

        # -- quiet phase: every forgery refused, not one cache byte changed, nothing allocated --------
        cache_before = decode.engine.kv_cache.clone()
        rss_before = rss_bytes()
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        live = decode.reserve("live-1", prompts[0] + [1, 2, 3], params)  # a reservation awaiting its KV
        assert live is not None
        blocks = list(live.block_ids)
        outsider.forge("unknown-request", [0, 1, 2])
        outsider.forge(live.req_id, blocks)  # a live reservation's id and blocks, no credentials
        outsider.forge(live.req_id, [0, 1, 2])  # ... and other blocks
        stolen = auth_metadata(live.req_id, live.credential, secret="not the deployment's secret")
        outsider.forge(live.req_id, blocks, metadata=stolen)  # its credential, but no secret
        huge = 512 << 30
        outsider.forge("unknown-request", [0], total_bytes=huge)  # a header announcing 512 GiB
        outsider.forge(live.req_id, blocks, total_bytes=huge)
        n_256 = (256 << 20) // outsider.layout_bytes(1)
        outsider.forge("big", list(range(n_256)))  # a consistent header of 256 MiB of blocks
        assert set(outsider.codes) <= REFUSED, outsider.codes
        assert torch.equal(decode.engine.kv_cache, cache_before)  # changes no block
        assert rss_bytes() - rss_before < 64 << 20, "memory grew"
        # The live reservation is untouched: its own credential still opens it, once, with the deployment's
        # secret, and a replay of exactly those credentials is refused.
        genuine = auth_metadata(live.req_id, live.credential, secret=dep.transfer.secret)
        outsider.codes.clear()
        outsider.forge(live.req_id, blocks, total_bytes=huge, metadata=genuine)  # admitted, then refused
        outsider.forge(live.req_id, blocks, metadata=genuine)  # the replay
        assert outsider.codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED]
        assert torch.equal(decode.engine.kv_cache, cache_before)
        decode.abort(live.req_id)

        # -- attack phase: real streams while the outsider forges and idles ---------------------------
        outsider.codes.clear()
        release = threading.Event()
        idle = outsider.idle_streams(4, release)
        idle_sockets = outsider.idle_data_connections(4)
        seen_ids: list[str] = []
        stop = threading.Event()

        def attack() -> None:
            while not stop.is_set():
                for req_id in list(seen_ids) or ["nobody"]:  # live requests' ids, from the public API
                    outsider.forge(req_id, [0, 1])
                    outsider.forge(req_id, [0], total_bytes=huge)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        rss_before = rss_bytes()
        results = run_concurrently(client, prompts, seen_ids)
        stop.set()
        attacker.join(30)
        release.set()
        for sock in idle_sockets:
            sock.close()
        # The idle streams were refused at once, from their metadata alone.
        assert all(call.exception(timeout=10).code() in REFUSED for call in idle)
        assert outsider.codes and set(outsider.codes) <= REFUSED, set(outsider.codes)
        for i, (tokens, took_s, kv_transfer_ms) in enumerate(results):
            assert tokens == baseline[i][0], f"request {i} came out wrong under attack"
            assert took_s < max(5.0, 4 * unhindered_s), f"request {i} took {took_s:.1f} s under attack"
            assert kv_transfer_ms < 1000, f"request {i}'s KV took {kv_transfer_ms:.0f} ms under attack"
        assert rss_bytes() - rss_before < 64 << 20, "memory grew under attack"
        # After the attack: prompts served from the prefix cache come back exact.
        assert [collect(client, prompt, MAX_TOKENS)[0] for prompt in prompts] == [t for t, _ in baseline]
    outsider.channel.close()
