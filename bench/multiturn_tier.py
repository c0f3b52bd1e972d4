"""The multi-turn workload against deployments that differ in their prefix cache's host
tier (issue 19): prefix hit rate, TTFT p50/p99 and throughput side by side.

    python -m pdserve.bench.multiturn_tier --config tier-off=deploy/cpu-multiturn.yaml \\
        --config tier-on=deploy/cpu-multiturn-tier.yaml --output bench/results/multiturn_tier_cpu.json

Each --config deployment is brought up (deploy.launcher.up), given the same conversations
(bench/multiturn.py; the same seed, so the same tokens) through the gRPC API, and taken down
before the next; --url NAME=HOST:PORT measures a running router instead. The deployments
should differ only in engine.host_cache_gb / num_host_blocks, with a GPU cache too small to
hold every conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pdserve.bench.datasets import sample_random
from pdserve.bench.metrics import parse_metric_percentiles, percentile_label
from pdserve.bench.multiturn import add_multi_turn_arguments, build_conversations, run_multi_turn
from pdserve.bench.serve import open_sender
from pdserve.bench.sweep import DeploymentSpec, _config_deployment, _prepare, _split_named, _url_deployment
from pdserve.router.client import PdserveError

PERCENTILE_METRICS = ("ttft", "tpot", "e2el")
# Per-request lists kept in the JSON (the ITL lists are left out: a row per token).
DROPPED_KEYS = ("itls",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--url", action="append", default=[], metavar="NAME=HOST:PORT")
    add_multi_turn_arguments(parser)
    parser.add_argument("--max-concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="unmeasured requests of fresh tokens, as long as a first turn, sent before each run",
    )
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--metric-percentiles", default="50,99")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per deployment's run")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--output", default=None, metavar="PATH.json")
    args = parser.parse_args(argv)
    if not args.config and not args.url:
        parser.error("name at least one deployment with --config NAME=FILE or --url NAME=HOST:PORT")
    return args


def deployments(args: argparse.Namespace) -> list[DeploymentSpec]:
    specs = [_config_deployment(*_split_named("--config", value)) for value in args.config]
    return specs + [_url_deployment(*_split_named("--url", value)) for value in args.url]


def measure(args: argparse.Namespace, url: str) -> dict[str, object]:
    """One deployment's run of the conversations the flags name."""
    info = asyncio.run(_prepare(url, args.ready_timeout))
    conversations = build_conversations(args, info)
    first = conversations[0]
    warmup = sample_random(
        args.warmup_requests,
        len(first.turn_prompt(0, [], [])),
        first.output_len,
        0.0,
        args.vocab_size or info.vocab_size,
        args.seed + 1,
        [info.eos_token_id] if info.eos_token_id is not None else [],
    )
    metrics = asyncio.run(
        run_multi_turn(
            lambda: open_sender("pdserve", url),
            conversations,
            args.max_concurrency,
            args.multi_turn_think_time,
            args.seed,
            0.0,
            PERCENTILE_METRICS,
            parse_metric_percentiles(args.metric_percentiles),
            args.timeout,
            warmup=warmup,
        )
    )
    for key in DROPPED_KEYS:
        metrics.pop(key, None)
    # On a shared machine other jobs move the latencies: keep what the load was after the run.
    metrics["load_average_1m_after"] = os.getloadavg()[0]
    return metrics


def markdown_table(runs: dict[str, dict], percentiles: list[float]) -> str:
    labels = [percentile_label(p) for p in percentiles]
    header = (
        "| deployment | prefix hit rate | later turns | "
        + " | ".join(f"TTFT p{label} ms" for label in labels)
        + " | output tok/s | total tok/s | failed |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, m in runs.items():
        ttfts = " | ".join(f"{m[f'p{label}_ttft_ms']:.1f}" for label in labels)
        later = m["prefix_hit_rate_later_turns"]
        lines.append(
            f"| {name} | {m['prefix_hit_rate']:.3f} | {'-' if later is None else f'{later:.3f}'} | {ttfts} | "
            f"{m['output_throughput']:.0f} | {m['total_token_throughput']:.0f} | {m['failed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    percentiles = parse_metric_percentiles(args.metric_percentiles)
    runs: dict[str, dict] = {}
    try:
        for name, start, stop in deployments(args):
            print(f"== {name}", file=sys.stderr)
            try:
                runs[name] = measure(args, start())
            finally:
                stop()
    except (PdserveError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(markdown_table(runs, percentiles))
    for name, m in runs.items():
        by_turn = ", ".join("-" if r is None else f"{r:.2f}" for r in m["prefix_hit_rate_by_turn"])
        print(f"{name}: hit rate by turn {by_turn}")
    if args.output:
        report = {"command": "python -m pdserve.bench.multiturn_tier " + " ".join(argv or sys.argv[1:])}
        report.update(args=vars(args), runs=runs)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
