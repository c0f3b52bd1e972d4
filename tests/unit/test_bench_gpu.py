"""`python -m pdserve.bench.gpu --small`: the one-command GPU benchmark, at tiny shapes on CPU.

Checks that every row is measured for pdserve and transformers, that the floors
and ratios are filled in and sane, and that the cost model matches Llama-3-8B.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pdserve.bench import gpu
from pdserve.bench.gpu_limits import ModelCost
from pdserve.bench.gpu_report import ROWS, parse_only

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_small_run_fills_every_row(tmp_path) -> None:
    json_path, markdown_path = tmp_path / "gpu.json", tmp_path / "gpu.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.bench.gpu",
            "--small",
            "--json",
            str(json_path),
            "--markdown",
            str(markdown_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(json_path.read_text())
    assert result["errors"] == {}
    assert positive(result["limits"]["copy_gbps"]) and positive(result["limits"]["matmul_tflops"])
    assert set(result["rows"]) == set(ROWS)
    for key, row in result["rows"].items():
        assert positive(row["pdserve_value"]), key
        assert positive(row["floor"]) and positive(row["vs_floor"]), key
        if key == "pack_unpack":  # transformers has no counterpart
            assert "transformers_value" not in row and row["vs_transformers"] is None
        else:
            assert positive(row["transformers_value"]) and positive(row["vs_transformers"]), key
    # Nothing computes faster than its floor (pack/unpack's tiny buffer may sit in cache).
    for key in ("decode_b1", "decode_batch", "prefill"):
        assert result["rows"][key]["vs_floor"] < 1.0, key
    # Every timed decode step held the whole batch (no request finished or was preempted).
    shapes = gpu.SMALL
    assert result["rows"]["decode_b1"]["pdserve"]["smallest_batch_in_timed_steps"] == 1
    batch_row = result["rows"]["decode_batch"]["pdserve"]
    assert batch_row["smallest_batch_in_timed_steps"] == shapes.batch_decode_size
    assert batch_row["mean_context_per_request"] > shapes.batch_decode_context
    throughput = result["rows"]["throughput"]
    assert throughput["transformers"]["output_tokens"] == shapes.transformers_requests * shapes.output_len
    assert throughput["pdserve"]["num_requests"] == shapes.num_requests
    # The ratio is pdserve's speed over the other's, for ms rows too.
    prefill = result["rows"]["prefill"]
    assert prefill["vs_transformers"] == pytest.approx(
        prefill["transformers_value"] / prefill["pdserve_value"]
    )
    table = markdown_path.read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(ROWS)  # header + rows
    assert "vs transformers" in done.stdout  # the printed table


def test_only_and_skip_transformers(tmp_path) -> None:
    result = gpu.main(["--small", "--only", "3,pack_unpack", "--skip-transformers"])
    assert set(result["rows"]) == {"prefill", "pack_unpack"}
    assert "transformers" not in result
    assert all(row["vs_transformers"] is None for row in result["rows"].values())


def test_only_rejects_unknown_rows() -> None:
    assert parse_only("1, decode_batch") == ["decode_b1", "decode_batch"]
    with pytest.raises(SystemExit, match="unknown row"):
        parse_only("6")


def test_cost_model_is_llama3_8b() -> None:
    cost = ModelCost(gpu.LLAMA3_8B, torch.bfloat16)
    final_norm = gpu.LLAMA3_8B["hidden_size"]
    # Llama-3-8B has 8,030,261,248 parameters: layers, embedding, lm_head, final norm.
    assert cost.layer_params + 2 * cost.lm_head_params + final_norm == 8_030_261_248
    assert cost.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    # A batch-1 decode step reads ~15 GB of weights (no embedding table) plus the context's KV.
    assert cost.decode_step_bytes(512) == pytest.approx(15.08e9, rel=1e-3)


def test_small_long_context_run_fills_rows_6_to_10(tmp_path) -> None:
    """`python -m pdserve.bench.gpu_long --small`: every long-context row measured on both
    sides, with floors, at the model's raised position limit."""
    from pdserve.bench.gpu_long import LONG_ROWS, main

    result = main(["--small", "--json", str(tmp_path / "long.json"), "--markdown", str(tmp_path / "long.md")])
    assert result["errors"] == {}
    assert set(result["rows"]) == set(LONG_ROWS)
    for key, row in result["rows"].items():
        assert positive(row["pdserve_value"]) and positive(row["floor"]), key
        assert positive(row["transformers_value"]) and positive(row["vs_transformers"]), key
    assert json.loads((tmp_path / "long.json").read_text())["rows"].keys() == result["rows"].keys()
    assert sorted(number for number, _, _ in LONG_ROWS.values()) == [6, 7, 8, 9, 10]
    assert parse_only("6,decode_b1_128k", LONG_ROWS) == ["prefill_32k", "decode_b1_128k"]


def test_profile_steps_runs_chosen_cases_and_sorts_kernels_by_kind(tmp_path) -> None:
    """`python -m pdserve.bench.profile_steps --small --cases prefill --prefill-tokens N`: only
    that case, at that length; kernel names fall into GEMM / attention / other."""
    from pdserve.bench.profile_steps import kernel_kind, main

    path = str(tmp_path / "p.json")
    result = main(["--small", "--cases", "prefill", "--prefill-tokens", "300", "--json", path])
    assert set(result) == {"device", "gc_heap", "prefill"}
    assert result["prefill"]["steps"] == 5 and positive(result["prefill"]["wall_ms"])
    assert json.loads((tmp_path / "p.json").read_text())["prefill"]["steps"] == 5
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "gemm",
        "_silu_and_mul_kernel": "other",
        "_merge_kernel": "other",
    }
    assert {name: kernel_kind(name) for name in names} == names
    with pytest.raises(SystemExit):
        main(["--small", "--cases", "prefill,nonsense"])
