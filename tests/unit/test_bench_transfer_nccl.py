"""bench.transfer_nccl on gloo (CPU): the same code as the two-GPU run, small shapes, with
the profiled rounds whose timelines line up both ranks' events."""

from __future__ import annotations

import json

from pdserve.bench import transfer_nccl


def test_transfer_bench_on_gloo_with_both_ranks_profiled(tmp_path) -> None:
    out, profile = tmp_path / "t.json", tmp_path / "profile.json"
    argv = ["--cpu", "--tokens", "64", "--layers", "2", "--num-blocks", "16"]
    argv += ["--rounds", "1", "--warmup", "1"]
    assert transfer_nccl.main(argv + ["--json", str(out), "--profile", str(profile)]) == 0
    row = json.loads(out.read_text())
    assert row["bit_exact"] and row["serial_ms_median"] > 0 and row["raw_send_ms_median"] > 0
    rounds = json.loads(profile.read_text())
    last = transfer_nccl.PROFILED_ROUNDS - 1
    assert {f"{mode} round {last}" for mode in ("pipelined", "serial", "raw")} <= set(rounds)
    for mode in ("serial", "raw"):
        events = rounds[f"{mode} round {last}"]
        ranks = {rank for _, _, rank, kind, _ in events if kind != "end"}
        assert ranks == {0, 1}, events  # the receiver's recv shows up inside the sender's round
        assert events[-1][3] == "end" and all(e[0] <= events[-1][0] for e in events)
