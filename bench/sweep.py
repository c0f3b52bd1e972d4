"""Run `bench serve` at a ladder of request rates against one or more deployments.

    python -m pdserve.bench.sweep --url colocated=127.0.0.1:50051 --config 1p1d=deploy/local.yaml \\
        --request-rates 1,2,4,inf --num-prompts 100 --goodput ttft:500 tpot:50 \\
        --output-dir bench/results/sweep

A deployment is a running router (`--url NAME=HOST:PORT`) or a deploy config the
sweep brings up and down itself (`--config NAME=path.yaml`, through
deploy.launcher.up). For each deployment it finds the highest rate whose SLO
attainment (good requests / sent requests) reaches --slo-attainment, and writes
sweep.md (comparison table), sweep.json, and PNG plots when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import PERCENTILE_METRICS, parse_goodput, parse_metric_percentiles
from pdserve.bench.serve import add_workload_arguments, build_requests, run_benchmark
from pdserve.router.client import AsyncPdserveClient, ModelInfo, PdserveError

# (name, start() -> router URL, stop())
DeploymentSpec = tuple[str, Callable[[], str], Callable[[], None]]


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--request-rates needs positive rates or inf, got {text!r}")
    return rates


def meets_slo(metrics: dict, slos_ms: dict[str, float], attainment: float) -> bool:
    """No failures, and with SLOs, at least `attainment` of sent requests within every SLO."""
    if metrics["failed"]:
        return False
    if not slos_ms:
        return True
    return metrics["slo_attainment"] >= attainment


def _config_deployment(name: str, config_path: str) -> DeploymentSpec:
    handle: dict[str, object] = {}

    def start() -> str:
        try:
            from pdserve.deploy import launcher
        except ImportError as error:
            raise RuntimeError(f"--config {name}={config_path} needs deploy.launcher ({error})") from None
        if not hasattr(launcher, "up"):
            raise RuntimeError("deploy.launcher has no up(config_path); use --url with a running router")
        handle["deployment"] = launcher.up(config_path)
        return handle["deployment"].url

    def stop() -> None:
        deployment = handle.pop("deployment", None)
        if deployment is not None:
            deployment.down()

    return name, start, stop


def _url_deployment(name: str, url: str) -> DeploymentSpec:
    return name, lambda: url, lambda: None


def _split_named(flag: str, value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"{flag} takes NAME=VALUE, got {value!r}")
    return name, rest


async def _prepare(url: str, ready_timeout: float) -> ModelInfo:
    async with AsyncPdserveClient(url) as client:
        await client.wait_ready(ready_timeout)
        return await client.model_info()


def run_sweep(
    deployments: Sequence[DeploymentSpec],
    rates: Sequence[float],
    make_requests: Callable[[ModelInfo, int], list[BenchRequest]],
    slos_ms: dict[str, float] | None = None,
    attainment: float = 0.9,
    ready_timeout: float = 120.0,
    warmup_requests: int = 4,
    **bench_kwargs: object,
) -> dict[str, object]:
    """Benchmark every deployment at every rate; stop each deployment when done with it.

    `make_requests(info, round)` gives round 0's requests to the warm-up and round i + 1's to the
    i-th rate: fresh prompts each time (the CLI varies the dataset's seed), or every rate after the
    first would find its prompts in the workers' prefix caches, and so would its first few after
    the warm-up (measured: a 2,048-token 1P1D sweep's second rate moved almost no KV).
    `bench_kwargs` go to bench.serve.run_benchmark (burstiness, max_concurrency, seed, timeout, ...);
    the markdown table needs percentile_metrics to include all four metrics with p99 (the default here).
    """
    bench_kwargs.setdefault("percentile_metrics", PERCENTILE_METRICS)
    bench_kwargs.setdefault("metric_percentiles", (50.0, 99.0))
    slos_ms = slos_ms or {}
    report: dict[str, object] = {
        "rates": list(rates),
        "slos_ms": slos_ms,
        "attainment": attainment,
        "deployments": {},
    }
    for name, start, stop in deployments:
        runs = []
        try:
            url = start()
            info = asyncio.run(_prepare(url, ready_timeout))
            # Unmeasured warm-up: otherwise the first rate also pays the workers' cold start
            # (first forward passes, first KV transfer), tens of ms of TTFT on CPU.
            warmup = make_requests(info, 0)[:warmup_requests]
            asyncio.run(run_benchmark(url, warmup, timeout=ready_timeout))
            for round_index, rate in enumerate(rates, start=1):
                requests = make_requests(info, round_index)
                print(f"[{name}] rate {rate:g}/s: {len(requests)} requests", file=sys.stderr)
                metrics = asyncio.run(
                    run_benchmark(url, requests, request_rate=rate, goodput_slos_ms=slos_ms, **bench_kwargs)
                )
                good = metrics["request_goodput"] * metrics["duration"] if slos_ms else metrics["completed"]
                metrics["slo_attainment"] = good / len(requests)
                metrics["meets_slo"] = meets_slo(metrics, slos_ms, attainment)
                runs.append(metrics)
        finally:
            stop()
        passing = [m["request_rate"] for m in runs if m["meets_slo"]]
        report["deployments"][name] = {
            "url": url,
            "model": info.model_name,
            "runs": runs,
            "max_rate_meeting_slo": max(passing) if passing else None,
        }
    return report


LATENCY_COLUMNS = (
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "p99_itl_ms",
    "p99_e2el_ms",
)


def markdown_table(report: dict[str, object]) -> str:
    slos = ", ".join(f"{k} <= {v:g} ms" for k, v in report["slos_ms"].items()) or "none (no failures)"
    lines = [
        f"SLOs: {slos}; attainment >= {report['attainment']:.0%}",
        "",
        "| deployment | max rate meeting SLO (req/s) |",
        "|---|---|",
    ]
    for name, result in report["deployments"].items():
        best = result["max_rate_meeting_slo"]
        lines.append(f"| {name} | {'none' if best is None else f'{best:g}'} |")
    lines += [
        "",
        "| deployment | rate | req/s | out tok/s | goodput | attain | p50 TTFT | p99 TTFT | "
        "p50 TPOT | p99 TPOT | p99 ITL | p99 E2EL | failed | SLO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in report["deployments"].items():
        for m in result["runs"]:
            goodput = "-" if m["request_goodput"] is None else f"{m['request_goodput']:.2f}"
            cells = [
                name,
                f"{m['request_rate']:g}",
                f"{m['request_throughput']:.2f}",
                f"{m['output_throughput']:.1f}",
                goodput,
                f"{m['slo_attainment']:.0%}",
                *(f"{m[key]:.1f}" for key in LATENCY_COLUMNS),
                str(m["failed"]),
                "yes" if m["meets_slo"] else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nLatencies in ms; p50 is the median.")
    return "\n".join(lines)


def write_plots(report: dict[str, object], output_dir: Path) -> list[Path]:
    """Latency percentiles vs rate, and TTFT/TPOT CDFs; [] with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    rates = report["rates"]
    positions = list(range(len(rates)))  # categorical x: inf has no place on a numeric axis
    written = []
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, metric in zip(axes, ("ttft", "tpot", "e2el"), strict=False):
        for name, result in report["deployments"].items():
            by_rate = {m["request_rate"]: m for m in result["runs"]}
            for key, style in (("median", "--"), ("p99", "-")):
                values = [by_rate[r][f"{key}_{metric}_ms"] if r in by_rate else math.nan for r in rates]
                axis.plot(positions, values, style, marker="o", label=f"{name} {key}")
        axis.set_xticks(positions, [f"{r:g}" for r in rates])
        axis.set(xlabel="request rate (req/s)", ylabel=f"{metric.upper()} (ms)", title=metric.upper())
        axis.legend(fontsize=7)
    figure.tight_layout()
    written.append(output_dir / "latency_vs_rate.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    for metric, key in (("ttft", "ttfts"), ("tpot", "tpots")):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for name, result in report["deployments"].items():
            for m in result["runs"]:
                pairs = zip(m[key], m["errors"], strict=True)
                values = sorted(v * 1000.0 for v, error in pairs if not error and v > 0)
                if values:
                    fractions = [(i + 1) / len(values) for i in range(len(values))]
                    axis.step(values, fractions, where="post", label=f"{name} @ {m['request_rate']:g}/s")
        axis.set(
            xlabel=f"{metric.upper()} (ms)", ylabel="fraction of requests", title=f"{metric.upper()} CDF"
        )
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(output_dir / f"{metric}_cdf.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written


def write_report(report: dict[str, object], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    (output_dir / "sweep.md").write_text(markdown_table(report) + "\n")
    return [output_dir / "sweep.json", output_dir / "sweep.md", *write_plots(report, output_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=CONFIG.yaml")
    parser.add_argument("--request-rates", default="1,2,4,inf")
    parser.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="fraction of requests that must meet every --goodput SLO (DistServe uses 0.9)",
    )
    parser.add_argument("--output-dir", default="bench/results/sweep")
    add_workload_arguments(parser)
    args = parser.parse_args(argv)
    try:
        deployments = [_url_deployment(*_split_named("--url", v)) for v in args.url]
        deployments += [_config_deployment(*_split_named("--config", v)) for v in args.config]
        if not deployments:
            raise ValueError("name at least one deployment with --url NAME=HOST:PORT or --config NAME=FILE")
        report = run_sweep(
            deployments,
            parse_rates(args.request_rates),
            lambda info, round_index: build_requests(args, info, seed=args.seed + round_index),
            slos_ms=parse_goodput(args.goodput),
            attainment=args.slo_attainment,
            ready_timeout=args.ready_timeout,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            temperature=args.temperature,
            timeout=args.timeout,
            # The table needs p99 of every metric, whatever --percentile-metrics says.
            percentile_metrics=PERCENTILE_METRICS,
            metric_percentiles=sorted({99.0, *parse_metric_percentiles(args.metric_percentiles)}),
            disable_progress=args.disable_tqdm,
        )
    except (PdserveError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    for path in write_report(report, Path(args.output_dir)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
