"""Shared pieces of the gRPC transfer tests: a decode-side server over a small cache, and
the helpers the data-plane and striping tests both use."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.transfer.contract import KVArrival, KVHandle
from pdserve.transfer.credentials import KVGate, auth_tag
from pdserve.transfer.grpc_backend import AUTH_KEY, CREDENTIAL_KEY, REQ_ID_KEY, GrpcKVSender
from pdserve.transfer.grpc_server import GrpcKVServer
from pdserve.transfer.layout import KVLayout
from pdserve.transfer.packing import buffer_nbytes, unpack_into
from pdserve.transfer.peers import GrpcPeer
from pdserve.transfer.source import CacheBlocks
from tests.unit.threads import run_in_threads

MODEL = "tiny"
SECRET = "grpc-kv-tests-deployment-secret"  # the deployment secret both ends of these tests share
FIRST_TOKEN = 4242  # the first sampled token the tests' sends carry


def make_cache(
    num_blocks: int, dtype: torch.dtype = torch.float32, seed: int = 0, **dims: int
) -> torch.Tensor:
    # [num_layers, 2, num_blocks, block_size, Hkv, head_dim]
    layers, block_size, heads = dims.get("layers", 2), dims.get("block_size", 4), dims.get("heads", 2)
    shape = (layers, 2, num_blocks, block_size, heads, dims.get("head_dim", 16))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class Server:
    """A decode side with a cache (on `device`), scattering into it, recording ready request ids
    and every `KVArrival` (`arrivals`). `watch(buffer)` sees every arrived buffer first;
    `server_options` go to GrpcKVServer; `address`: where it binds (a free port by default)."""

    def __init__(
        self,
        num_blocks: int = 32,
        dtype: torch.dtype = torch.float32,
        data_port: int = 0,
        device: str = "cpu",
        watch: Callable[[torch.Tensor], None] | None = None,
        server_options: dict[str, Any] | None = None,
        address: str = "127.0.0.1:0",
        **dims: int,
    ) -> None:
        self.cache = torch.zeros_like(make_cache(num_blocks, dtype, **dims)).to(device)
        self.layout = KVLayout.from_cache(self.cache, MODEL)
        self.ready: list[str] = []
        self.arrivals: list[KVArrival] = []
        self.scatter = unpack_into(self.cache, self.ready.append)
        self.watch = watch
        self.gate = KVGate(SECRET)
        options = {"gate": self.gate, **(server_options or {})}
        self.server = GrpcKVServer(address, self, self.layout, data_port=data_port, **options)
        self.server.start()

    def on_kv_chunk(self, arrival: KVArrival, layers: slice, chunk: torch.Tensor) -> None:
        """The server's sink: chunk [layers.stop - layers.start, 2, n, block_size, Hkv, D]."""
        self.arrivals.append(arrival)
        if self.watch is not None:
            self.watch(chunk)
        self.scatter.on_kv_chunk(arrival, layers, chunk)

    def pending_tokens(self) -> int:
        listener = self.server._data_listener
        assert listener is not None
        return listener.pending_tokens()

    def handle(self, req_id: str, block_ids: list[int]) -> KVHandle:
        """A reservation of `block_ids` for `req_id`, as a decode worker's reserve makes it."""
        n_tokens = len(block_ids) * self.layout.block_size
        credential = self.gate.issue(req_id, block_ids, buffer_nbytes(self.layout, len(block_ids)))
        peer = GrpcPeer(self.server.address)
        return KVHandle(req_id, "decode-0", block_ids, n_tokens, self.layout, peer, credential=credential)


def auth_metadata(req_id: str, credential: bytes, secret: str = SECRET) -> tuple[tuple[str, str], ...]:
    """A push's credentials, as `GrpcKVSender` presents them."""
    return (
        (REQ_ID_KEY, req_id),
        (CREDENTIAL_KEY, credential.hex()),
        (AUTH_KEY, auth_tag(secret, req_id, credential)),
    )


def server_auth(server: Server, req_id: str, block_ids: list[int]) -> tuple[tuple[str, str], ...]:
    """Reserve `block_ids` for `req_id` on `server` and give the push's credentials for it."""
    return auth_metadata(req_id, server.handle(req_id, block_ids).credential)


def assert_closed_by_server(conn: socket.socket) -> None:
    """The server closed `conn`: EOF, or a reset where it left bytes of ours unread."""
    conn.settimeout(3)
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass


def wait_until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def push_and_check_from_two_threads(
    sender: GrpcKVSender, decode: Server, sources: list[torch.Tensor]
) -> None:
    """Two threads each send 4 rounds of their source's 32 blocks to rotating destinations in
    `decode`'s cache, at once; then the last round's blocks must equal the sources, bit for bit."""

    def push(i: int) -> None:
        for round_ in range(4):
            dst_ids = [i * 32 + (j + round_) % 32 for j in range(32)]
            sender.send(
                decode.handle(f"t{i}-{round_}", dst_ids),
                CacheBlocks(sources[i], list(range(32))),
                FIRST_TOKEN,
            )

    assert not run_in_threads(push, len(sources), timeout_s=60)
    for i, source in enumerate(sources):
        dst_ids = [i * 32 + (j + 3) % 32 for j in range(32)]  # the last round wrote these
        assert torch.equal(bits(decode.cache[:, :, dst_ids].cpu()), bits(source.cpu()))
