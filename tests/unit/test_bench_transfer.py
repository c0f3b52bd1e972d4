"""bench.transfer's CPU-sized run: pack/unpack, and the gRPC host path over the socket data
plane both ways (the server's striping, and one data connection as its baseline)."""

from __future__ import annotations

import json

from pdserve.bench import transfer


def test_small_transfer_bench_runs_both_socket_paths(tmp_path) -> None:
    out = tmp_path / "transfer.json"
    transfer.main(["--small", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["request_nbytes"] == 33_554_432
    assert result["grpc_data_streams"] == 1 == result["grpc_data_streams_one_stream"]  # < 2 x 32 MiB
    assert result["grpc_ms"] > 0 and result["grpc_ms_one_stream"] > 0 and result["grpc_streams_speedup"] > 0
    assert 0 < result["pack_unpack_vs_copy"]
