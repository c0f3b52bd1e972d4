"""Benchmark metrics with vLLM's names and definitions (`vllm bench serve`).

Per request, measured at the client:
- TTFT: send -> first chunk holding tokens.
- ITL: the gap between consecutive chunks after the first (one value per chunk).
- E2EL: send -> last chunk.
- TPOT: (E2EL - TTFT) / (output tokens - 1), only for requests with > 1 output token.

Goodput (DistServe): completed requests per second whose every chosen metric
(ttft, tpot, e2el) is within its SLO; a request with one output token counts
TPOT as 0 there, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
SERVER_TIMING_NAMES = ("queue_ms", "prefill_ms", "kv_transfer_ms", "decode_ms", "ttft_ms")


@dataclass
class RequestResult:
    """What one request did, in seconds (as vLLM records it)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""
    request_id: str = ""
    finish_reason: str = ""
    cached_tokens: int = 0
    # The tokens streamed back, in order (gRPC backend): what a multi-turn conversation resends.
    output_token_ids: list[int] = field(default_factory=list)
    # Timings from the server's Complete message (milliseconds), when it came.
    server_timings: dict[str, float] | None = None


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput takes NAME:MS with NAME in {', '.join(GOODPUT_METRICS)}; got {spec!r}"
            )
        try:
            slo_ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number of milliseconds") from None
        if slo_ms < 0:
            raise ValueError(f"--goodput {spec!r}: the SLO must be >= 0 ms")
        slos[name] = slo_ms
    return slos


def parse_percentile_metrics(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in PERCENTILE_METRICS:
            raise ValueError(
                f"--percentile-metrics: unknown {name!r}; choose from {', '.join(PERCENTILE_METRICS)}"
            )
    return names


def parse_metric_percentiles(text: str) -> list[float]:
    values = [float(p) for p in text.split(",") if p.strip()]
    for p in values:
        if not 0.0 < p < 100.0:
            raise ValueError(f"--metric-percentiles: {p} is not in (0, 100)")
    return values


def percentile_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key spelling: p99_ttft_ms)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def request_tpot(result: RequestResult) -> float:
    """Seconds per output token after the first; 0 when there is at most one output token."""
    if result.output_tokens <= 1:
        return 0.0
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def count_good_requests(results: Sequence[RequestResult], slos_ms: dict[str, float]) -> int:
    """Completed requests whose every metric named in `slos_ms` is within its SLO."""
    good = 0
    for result in results:
        if not result.success:
            continue
        values_ms = {
            "ttft": result.ttft * 1000.0,
            "tpot": request_tpot(result) * 1000.0,
            "e2el": result.latency * 1000.0,
        }
        if all(values_ms[name] <= slo for name, slo in slos_ms.items()):
            good += 1
    return good


def _summarize(prefix: str, values_s: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    # vLLM reports 0 for a metric with no samples rather than NaN.
    data_ms = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    summary = {
        f"mean_{prefix}_ms": float(np.mean(data_ms)),
        f"median_{prefix}_ms": float(np.median(data_ms)),
        f"std_{prefix}_ms": float(np.std(data_ms)),
    }
    for p in percentiles:
        summary[f"p{percentile_label(p)}_{prefix}_ms"] = float(np.percentile(data_ms, p))
    return summary


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    goodput_slos_ms: dict[str, float] | None = None,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
    metric_percentiles: Sequence[float] = (99.0,),
) -> dict[str, object]:
    """The benchmark result dict: vLLM's keys plus pdserve's server-side timings."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    completed = [r for r in results if r.success]
    ttfts = [r.ttft for r in completed]
    tpots = [request_tpot(r) for r in completed if r.output_tokens > 1]
    itls = [gap for r in completed for gap in r.itl]
    e2els = [r.latency for r in completed]
    total_input = sum(r.prompt_len for r in completed)
    total_output = sum(r.output_tokens for r in completed)

    metrics: dict[str, object] = {
        "duration": duration_s,
        "completed": len(completed),
        "failed": len(results) - len(completed),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(completed) / duration_s,
        "request_goodput": (
            count_good_requests(results, goodput_slos_ms) / duration_s if goodput_slos_ms else None
        ),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    series = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name in PERCENTILE_METRICS:
        # Means and medians of every metric are always kept; percentiles only where asked.
        metrics.update(
            _summarize(name, series[name], metric_percentiles if name in percentile_metrics else ())
        )

    with_server = [r.server_timings for r in completed if r.server_timings is not None]
    for timing in SERVER_TIMING_NAMES:
        values = [t[timing] for t in with_server]
        metrics[f"mean_server_{timing}"] = float(np.mean(values)) if values else None
    metrics["total_cached_tokens"] = sum(r.cached_tokens for r in completed)
    # Prompt tokens the server served from its prefix cache (GPU or host tier), of all sent.
    metrics["prefix_hit_rate"] = metrics["total_cached_tokens"] / total_input if total_input else 0.0

    # Per-request lists (seconds, like vLLM's JSON) for plots and cross-checks.
    metrics["input_lens"] = [r.prompt_len for r in results]
    metrics["output_lens"] = [r.output_tokens for r in results]
    metrics["ttfts"] = [r.ttft for r in results]
    metrics["tpots"] = [request_tpot(r) for r in results]
    metrics["e2els"] = [r.latency for r in results]
    metrics["itls"] = [r.itl for r in results]
    metrics["server_ttfts_ms"] = [r.server_timings["ttft_ms"] if r.server_timings else None for r in results]
    metrics["request_ids"] = [r.request_id for r in results]
    metrics["errors"] = [r.error for r in results]
    return metrics


def format_summary(
    metrics: dict[str, object],
    percentile_metrics: Sequence[str],
    metric_percentiles: Sequence[float],
    title: str = "Serving Benchmark Result",
) -> str:
    """A fixed-width table laid out like vLLM's."""
    lines = [f"{' ' + title + ' ':=^50}"]

    def row(label: str, value: object, digits: int = 2) -> None:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:<10}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    row("Benchmark duration (s):", metrics["duration"])
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"])
    if metrics.get("request_goodput") is not None:
        row("Request goodput (req/s):", metrics["request_goodput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"])
    if metrics.get("prefix_hit_rate") is not None:
        row("Prefix hit rate (cached/prompt tokens):", metrics["prefix_hit_rate"], 3)
    headers = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name in percentile_metrics:
        lines.append(f"{headers[name]:-^50}")
        row(f"Mean {name.upper()} (ms):", metrics[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", metrics[f"median_{name}_ms"])
        for p in metric_percentiles:
            label = percentile_label(p)
            row(f"P{label} {name.upper()} (ms):", metrics[f"p{label}_{name}_ms"])
    if metrics.get("mean_server_ttft_ms") is not None:
        lines.append(f"{'Server-side timings (mean)':-^50}")
        for timing in SERVER_TIMING_NAMES:
            row(f"Server {timing.removesuffix('_ms')} (ms):", metrics[f"mean_server_{timing}"])
    lines.append("=" * 50)
    return "\n".join(lines)
