#!/usr/bin/env bash
# The GPU runs behind bench/results/, exactly as made (through the device tool, from
# the repository root, with Ray packed into .devpack/ as ../shared/gpu/README.md says).
#   bash bench/run_gpu_suite.sh single   # one GPU: GPU tests, bench.gpu, co-located sweep
#   bash bench/run_gpu_suite.sh pair     # two GPUs: 1P1D over NCCL, transfer, sweep vs co-located
#   bash bench/run_gpu_suite.sh kernels  # one GPU: fused-op, transfer and engine tests, bench.transfer, bench.gpu
#   bash bench/run_gpu_suite.sh link     # two GPUs: NCCL KV transfer, pipelined and serial, profiled rounds
#   bash bench/run_gpu_suite.sh tests    # one GPU: the single-GPU tests in tests/gpu
#   bash bench/run_gpu_suite.sh final    # one GPU: the whole bench.gpu, bench.gemv, profile
#   bash bench/run_gpu_suite.sh profile  # one GPU: bench.profile_steps
#   bash bench/run_gpu_suite.sh grpc1    # one GPU: 1P1D over gRPC on it, bench.transfer (gRPC host path)
#   bash bench/run_gpu_suite.sh sweep1grpc # one H200: 1P1D over gRPC sharing it, 4 data streams vs 1
#   bash bench/run_gpu_suite.sh structure  # one GPU: bench.gpu, and 1P1D over gRPC on it (the connector)
#   bash bench/run_gpu_suite.sh tp1        # one GPU: every single-GPU test, bench.gpu's pdserve rows (TP=1)
#   bash bench/run_gpu_suite.sh longprefill # one GPU: fused long-prefill attention: tests, chunks, rows 6 and 9
#   bash bench/run_gpu_suite.sh hosttier   # one GPU: host tier copy-stream tests, bench.host_tier at 32k
#   bash bench/run_gpu_suite.sh hosttier8k # one GPU: bench.host_tier at 8k
#   bash bench/run_gpu_suite.sh tierrows   # one GPU: bench.host_tier at 32k, bench.gpu's pdserve rows 1-3
#   bash bench/run_gpu_suite.sh tiercheck  # one GPU: fused-prefix and host tier GPU tests, bench.host_tier at 32k
#   bash bench/run_gpu_suite.sh tpmulti    # four GPUs: TP graphs over NCCL, rank-to-rank KV between TP sizes
#   bash bench/run_gpu_suite.sh multiturn  # one H200: multi-turn serving, prefix cache's host tier off vs on
#   bash bench/run_gpu_suite.sh tpcuda     # one GPU (two for the graph test): TP=2 with the Triton kernels / CUDA graphs vs TP=1
# Results land in $OUT (default bench/results/gpu-run).
set -uo pipefail
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
[ -f .devpack/install.sh ] && bash .devpack/install.sh
export PYTHONPATH="/tmp/site:$PWD:$PWD/proto:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
SLO="ttft:1000 tpot:50"

case "${1:-}" in
  single)
    timeout 150 python -m pytest tests/gpu/test_engine_gpu.py tests/gpu/test_disagg_gpu.py -q 2>&1 \
      | tail -5 | tee "$OUT/gpu_tests.txt"
    timeout 330 python -m pdserve.bench.gpu --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tail -40
    timeout 100 python -m pdserve.bench.sweep --config colocated=deploy/gpu-colocated-1.yaml \
      --dataset random --random-input-len 256 --random-output-len 256 --num-prompts 48 \
      --request-rates 4,16 --goodput $SLO --output-dir "$OUT/sweep-short" --disable-tqdm 2>&1 | tail -15
    ;;
  pair)
    timeout 120 python -m pytest tests/gpu/test_disagg_gpu.py -q 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
    timeout 90 python -m pdserve.bench.transfer_nccl --json "$OUT/transfer_nccl.json" 2>&1 | tail -6
    timeout 330 python -m pdserve.bench.sweep --config colocated-2=deploy/gpu-colocated-2.yaml \
      --config 1p1d=deploy/gpu-1p1d.yaml --dataset random --random-input-len 2048 \
      --random-output-len 256 --num-prompts 48 --request-rates 2,6 --goodput $SLO \
      --output-dir "$OUT/sweep-long" --disable-tqdm 2>&1 | tail -20
    ;;
  kernels)
    # After the fused-kernel and transfer changes: tests, bench.gpu, transfer on 1 and 2 GPUs.
    timeout 80 python -m pytest tests/gpu/test_fused_ops.py -q -x 2>&1 | tail -3 | tee "$OUT/fused_tests.txt"
    grep -q " passed" "$OUT/fused_tests.txt" && ! grep -q "failed\|error" "$OUT/fused_tests.txt" \
      || export PDSERVE_DISABLE_FUSED_OPS=1   # keep measuring with the torch ops
    timeout 110 python -m pytest tests/gpu/test_transfer_gpu.py tests/gpu/test_engine_gpu.py -q 2>&1 \
      | tail -6 | tee "$OUT/gpu_tests.txt"
    timeout 60 python -m pdserve.bench.transfer --json "$OUT/transfer.json" 2>&1 | tail -12
    timeout 270 python -m pdserve.bench.gpu --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tail -14
    ;;
  fused)
    # The fused RMSNorm/RoPE kernels: their tests, the engine's GPU tests with them on,
    # and pdserve's decode/prefill rows of bench.gpu with them on and off.
    timeout 100 python -m pytest tests/gpu/test_fused_ops.py -q 2>&1 | tail -8 | tee "$OUT/fused_tests.txt"
    timeout 100 python -m pytest tests/gpu/test_engine_gpu.py -q 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    timeout 100 python -m pdserve.bench.gpu --skip-transformers --only 1,2,3 --json "$OUT/gpu_fused.json" 2>&1 | tail -6
    ;;
  tests)
    # One GPU: every single-GPU test in tests/gpu (kernels against the reference, the engine's
    # exactness, pack/unpack); Triton compiles each kernel variant once, hence the time.
    timeout 560 python -m pytest tests/gpu/test_fused_ops.py tests/gpu/test_gemv.py tests/gpu/test_triton_attention.py \
      tests/gpu/test_engine_gpu.py tests/gpu/test_transfer_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 \
      | tee "$OUT/gpu_tests.txt"
    ;;
  sampling)
    # One GPU: logprobs, prompt logprobs and penalties on the fast backend against the CPU
    # reference, the engine's exactness, and bench.gpu's decode and prefill rows.
    timeout 200 python -m pytest tests/gpu/test_sampling_gpu.py tests/gpu/test_engine_gpu.py -q \
      -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    timeout 300 python -m pdserve.bench.gpu --skip-transformers --only 1,2,3 --json "$OUT/gpu.json" 2>&1 | tail -8
    ;;
  tpcuda)
    # TP=2 with the Triton attention kernels against TP=1 (same backend, float32): on one GPU both
    # ranks share it (tensor_parallel_shared_device, eager); with two GPUs, NCCL with each rank's
    # decode CUDA graphs (skipped on one GPU), and the reference-attention TP test beside them.
    # Then the engine's single-GPU tests, which must not change at TP=1 (graph capture, warm-up).
    timeout 240 python -m pytest tests/gpu/test_tensor_parallel_triton_gpu.py tests/gpu/test_tensor_parallel_gpu.py \
      -q -p no:cacheprovider -rs --durations=8 2>&1 | tail -20 | tee "$OUT/tp_gpu_tests.txt"
    timeout 200 python -m pytest tests/gpu/test_engine_gpu.py -q -p no:cacheprovider 2>&1 | tail -4 \
      | tee "$OUT/gpu_tests.txt"
    ;;
  tp1)
    # One GPU after the tensor-parallel split of the model runner (plan_step / run_step): every
    # single-GPU test in tests/gpu (CUDA graphs, kernels, exactness) and bench.gpu's pdserve rows
    # 1-5 (TP=1), to set beside the last committed run on the same kind of GPU.
    timeout 360 python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
    timeout 220 python -m pdserve.bench.gpu --skip-transformers --json "$OUT/gpu.json" \
      --markdown "$OUT/gpu.md" 2>&1 | tail -10
    ;;
  longprefill)
    # One GPU: the fused long-prefill path (cuDNN attention over a chunk's own keys and its gathered
    # cached prefix, merged by log-sum-exp): the chunk microbenchmark against the paged Triton
    # kernel, bench.gpu_long's prefill rows 6 (32k) and 9 (~128k) against their floors and
    # transformers, and its tests with the engine's GPU tests (exactness with CUDA graphs after the
    # TP step split) and the host tier's copy-stream tests. Each result is written as it comes.
    timeout 120 python -m pdserve.bench.long_prefill --json "$OUT/long_prefill.json" 2>&1 | tail -16
    timeout 150 python -m pdserve.bench.gpu_long --only 6 --json "$OUT/gpu_long_32k.json" \
      --markdown "$OUT/gpu_long_32k.md" 2>&1 | tail -5
    timeout 200 python -m pytest tests/gpu/test_triton_attention.py tests/gpu/test_engine_gpu.py \
      tests/gpu/test_host_tier_gpu.py -q -p no:cacheprovider \
      -k "long_chunks or prefix or sdpa or engine_gpu or host_tier" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
    timeout 240 python -m pdserve.bench.gpu_long --only 9 --json "$OUT/gpu_long_128k.json" \
      --markdown "$OUT/gpu_long_128k.md" 2>&1 | tail -5
    ;;
  tiercheck)
    # One GPU, after `long`: the fused long-prefill path's and the host tier's GPU tests (fresh
    # random inputs every run), then bench.host_tier at 32,000 tokens (TTFT from the host tier
    # against recomputing, the load's GB/s against a plain pinned copy). Each result as it comes.
    timeout 150 python -m pytest tests/gpu/test_triton_attention.py tests/gpu/test_engine_gpu.py -q \
      -p no:cacheprovider -k "long_chunks or fused_prefix or chunk_over_a_cached_prefix or sdpa" 2>&1 \
      | tail -4 | tee "$OUT/fused_prefix_tests.txt"
    timeout 120 python -m pytest tests/gpu/test_host_tier_gpu.py -q -p no:cacheprovider 2>&1 \
      | tail -4 | tee "$OUT/host_tier_tests.txt"
    timeout 320 python -m pdserve.bench.host_tier --prompt-tokens 32000 --max-position 131072 \
      --trace /tmp/host_tier_trace.json --json "$OUT/host_tier_32k.json" 2>&1 | tail -24
    ;;
  tpmulti)
    # Four GPUs (nvidia-h100-x4 / nvidia-h200-x4): tensor parallelism across real GPUs: TP=2 with
    # each rank's CUDA graphs and NCCL all-reduces against TP=1, the TP=2 NCCL tests against
    # transformers, then 1P1D over nccl between TP sizes with the KV going rank to rank (2->1,
    # 1->2, 2->2: per-rank byte counts, nothing staged on rank 0), then the TP deploy configs.
    timeout 240 python -m pytest tests/gpu/test_tensor_parallel_triton_gpu.py tests/gpu/test_tensor_parallel_gpu.py \
      -q -p no:cacheprovider -rs 2>&1 | tail -8 | tee "$OUT/tp_gpu_tests.txt"
    timeout 300 python -m pytest tests/gpu/test_disagg_gpu.py -q -p no:cacheprovider -rs \
      -k "between_tp_sizes or nccl_two_gpus" 2>&1 | tail -8 | tee "$OUT/tp_disagg_tests.txt"
    ;;
  long)
    # One GPU: bench.gpu's long-context rows 6-10 (32k and ~128k prefill and decode) against their
    # floors and transformers in the same run.
    timeout 590 python -m pdserve.bench.gpu_long --json "$OUT/gpu_long.json" --markdown "$OUT/gpu_long.md" \
      2>&1 | tail -14
    ;;
  chaos)
    # One GPU, 1P1D over gRPC sharing it (Llama-3-8B shape): 64 streams, the decode worker killed
    # mid-stream and restarted by Ray; time to the first migrated token and throughput.
    timeout 580 python -m pdserve.bench.chaos --config deploy/gpu-1p1d-grpc-1.yaml --kill decode --restart \
      --num-requests 64 --prompt-len 512 --max-tokens 256 --kill-after-tokens 4096 \
      --output "$OUT/chaos_gpu.json" 2>&1 | tail -40
    ;;
  hosttier)
    # One GPU: the host tier's copy-stream tests first, then TTFT of a 32,000-token prompt served
    # from the prefix cache's host tier against computing it again, the load's GB/s against a
    # plain pinned copy, and a reloaded prefix overlapped with its suffix's prefill (positions
    # raised to 131,072). Within one 600 s device call; `hosttier8k` runs the 8,000-token case.
    timeout 220 python -m pytest tests/gpu/test_host_tier_gpu.py tests/unit/test_host_tier.py -q -p no:cacheprovider 2>&1 \
      | tail -3 | tee "$OUT/host_tier_tests.txt"
    timeout 330 python -m pdserve.bench.host_tier --prompt-tokens 32000 --max-position 131072 \
      --trace /tmp/host_tier_trace.json --json "$OUT/host_tier_32k.json" 2>&1 | tail -30
    ;;
  tierrows)
    # One GPU: bench.host_tier at 32,000 tokens, then bench.gpu's pdserve rows 1-3 (TP=1).
    timeout 330 python -m pdserve.bench.host_tier --prompt-tokens 32000 --max-position 131072 \
      --trace /tmp/host_tier_trace.json --json "$OUT/host_tier_32k.json" 2>&1 | tail -24
    timeout 200 python -m pdserve.bench.gpu --skip-transformers --only 1,2,3 --json "$OUT/gpu.json" \
      --markdown "$OUT/gpu.md" 2>&1 | tail -8
    ;;
  hosttier8k)
    # One GPU: bench.host_tier at 8,000 tokens (the model's own 8,192 positions).
    timeout 250 python -m pdserve.bench.host_tier --json "$OUT/host_tier_8k.json" 2>&1 | tail -30
    ;;
  multiturn)
    # One GPU (H200), one co-located worker (Llama-3-8B shape) through the gRPC API: 64
    # conversations x 8 turns (shared 1,024-token system prompt, 256-token user messages,
    # 64-token replies; ~10,300 blocks in all) against a 4,096-block GPU cache, the host tier
    # off (deploy/gpu-multiturn.yaml) then on (deploy/gpu-multiturn-tier.yaml, 24 GiB):
    # prefix hit rate, TTFT p50/p99 and throughput of each.
    timeout 590 python -m pdserve.bench.multiturn_tier --config tier-off=deploy/gpu-multiturn.yaml \
      --config tier-on=deploy/gpu-multiturn-tier.yaml --multi-turn-num-conversations 64 \
      --multi-turn-turns 8 --multi-turn-system-len 1024 --multi-turn-user-len 256 \
      --multi-turn-output-len 64 --max-concurrency 16 --warmup-requests 16 --timeout 220 \
      --output "$OUT/multiturn_tier.json" 2>&1 | grep -v WARNING | tail -12
    ;;
  final)
    # One GPU: the whole bench.gpu (transformers included), bench.gemv and the step profile.
    timeout 300 python -m pdserve.bench.gpu --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tail -9
    timeout 60 python -m pdserve.bench.gemv --json "$OUT/gemv.json" 2>&1 | tail -7
    timeout 150 python -m pdserve.bench.profile_steps --json "$OUT/profile.json" 2>&1 | grep "wall\|steps$"
    ;;
  structure)
    # After the import-root / connector / three-call restructuring: bench.gpu against the last
    # stop's rows, and the disaggregated GPU tests (1P1D over gRPC on one GPU; the two-GPU NCCL
    # test skips itself).
    timeout 330 python -m pdserve.bench.gpu --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" 2>&1 | tail -12
    timeout 200 python -m pytest tests/gpu/test_disagg_gpu.py -q -p no:cacheprovider 2>&1 | tail -3 \
      | tee "$OUT/disagg_tests.txt"
    ;;
  grpc1)
    # One GPU: 1P1D over gRPC with both workers on it (the two-GPU NCCL test skips itself), and
    # bench.transfer: pack/unpack and the gRPC backend's host path (socket data plane, in band).
    timeout 200 python -m pytest tests/gpu/test_disagg_gpu.py -q -p no:cacheprovider 2>&1 | tail -3 \
      | tee "$OUT/disagg_tests.txt"
    timeout 90 python -m pdserve.bench.transfer --json "$OUT/transfer.json" 2>&1 | tail -14
    timeout 90 python -m pdserve.bench.transfer --grpc-in-band --json "$OUT/transfer_in_band.json" 2>&1 | grep -i grpc
    ;;
  profile)
    # One GPU: where a step's time goes (host phases vs kernels), graphs on and off.
    timeout 200 python -m pdserve.bench.profile_steps --json "$OUT/profile.json" 2>&1 | grep -v "USDT\|arn"
    ;;
  sweep1)
    # One GPU, co-located: the long- and short-prompt sweeps of the bench issue.
    timeout 200 python -m pdserve.bench.sweep --config colocated=deploy/gpu-colocated-1.yaml --dataset random \
      --random-input-len 2048 --random-output-len 256 --num-prompts 48 --request-rates 2,4,8 \
      --goodput $SLO --output-dir "$OUT/sweep-long" --disable-tqdm 2>&1 | tail -8
    timeout 150 python -m pdserve.bench.sweep --config colocated=deploy/gpu-colocated-1.yaml --dataset random \
      --random-input-len 256 --random-output-len 256 --num-prompts 48 --request-rates 4,16 \
      --goodput $SLO --output-dir "$OUT/sweep-short" --disable-tqdm 2>&1 | tail -6
    ;;
  sweep1grpc)
    # One GPU (H200): 1P1D over gRPC sharing it, long prompts, the data plane with 4 parallel
    # streams against the same deployment held to one (a copy of the config with data_streams: 1).
    sed 's/data_streams: 4/data_streams: 1/' deploy/gpu-1p1d-grpc-1.yaml > /tmp/gpu-1p1d-grpc-1-stream.yaml
    timeout 420 python -m pdserve.bench.sweep --config streams4=deploy/gpu-1p1d-grpc-1.yaml \
      --config streams1=/tmp/gpu-1p1d-grpc-1-stream.yaml --dataset random --random-input-len 2048 \
      --random-output-len 256 --num-prompts 48 --request-rates 2,4 --goodput $SLO \
      --output-dir "$OUT/sweep-1p1d-grpc" --disable-tqdm 2>&1 | tail -12
    ;;
  link)
    # Two GPUs: the pipelined NCCL KV transfer, and the nccl backend's own GPU test.
    timeout 100 python -m pytest tests/unit/test_transfer_nccl.py -m gpu -q 2>&1 | tail -3 | tee "$OUT/nccl_tests.txt"
    timeout 120 python -m pdserve.bench.transfer_nccl --json "$OUT/transfer_nccl.json" \
      --profile "$OUT/transfer_rounds.json" 2>&1 | grep -v "USDT\|arn" | tail -90
    ;;
  *)
    echo "usage: bash bench/run_gpu_suite.sh single|pair|kernels|fused|final|profile|sweep1|link" >&2
    exit 2
    ;;
esac
