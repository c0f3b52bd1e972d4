"""`pdserve top --url http://HOST:PORT`: a deployment's live state, read from its `/metrics`.

Every `--interval` seconds: per worker its role, running and waiting requests and KV cache
use; for the router its admission queue, requests finished (by reason), and the prompt and
generated tokens per second since the previous screen. Reads nothing but the Prometheus
text the router serves, so it works against any pdserve router with HTTP on.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def _total(samples: Samples, name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def render(samples: Samples, previous: Samples | None, elapsed_s: float) -> str:
    """One screen: a worker table, then the router's line."""
    rows: dict[str, dict[str, object]] = defaultdict(dict)
    for metric, key in (
        ("pdserve:num_requests_running", "running"),
        ("pdserve:num_requests_waiting", "waiting"),
        ("pdserve:kv_cache_usage_perc", "kv"),
    ):
        for labels, value in samples.get(metric, []):
            rows[labels["worker"]].update(role=labels["role"], **{key: value})
    lines = [f"{'worker':<14}{'role':<9}{'running':>8}{'waiting':>8}{'KV used':>9}"]
    for worker, row in sorted(rows.items()):
        lines.append(
            f"{worker:<14}{row.get('role', ''):<9}{row.get('running', 0):>8.0f}"
            f"{row.get('waiting', 0):>8.0f}{100 * row.get('kv', 0.0):>8.1f}%"
        )
    finished: dict[str, float] = defaultdict(float)
    for labels, value in samples.get("pdserve:request_success_total", []):
        finished[labels["finished_reason"]] += value
    done = ", ".join(f"{reason} {count:.0f}" for reason, count in sorted(finished.items()))
    rates = ""
    if previous is not None and elapsed_s > 0:
        prompt = _total(samples, "pdserve:prompt_tokens_total") - _total(
            previous, "pdserve:prompt_tokens_total"
        )
        gen = _total(samples, "pdserve:generation_tokens_total") - _total(
            previous, "pdserve:generation_tokens_total"
        )
        rates = f"; prompt {prompt / elapsed_s:,.0f} tok/s, generated {gen / elapsed_s:,.0f} tok/s"
    queue = _total(samples, "pdserve:router_queue_length")
    rejected = _total(samples, "pdserve:admission_rejections_total")
    lines.append(f"router: queue {queue:.0f}, rejected {rejected:.0f}, finished {done or 'none'}{rates}")
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    previous, previous_at = None, time.monotonic()
    shown = 0
    while args.iterations is None or shown < args.iterations:
        try:
            samples = scrape(args.url)
        except (urllib.error.URLError, OSError) as exc:
            raise ValueError(f"{args.url}/metrics: {exc}") from exc
        now = time.monotonic()
        screen = render(samples, previous, now - previous_at)
        print(("\x1b[2J\x1b[H" if args.clear else "") + screen, flush=True)
        previous, previous_at = samples, now
        shown += 1
        if args.iterations is None or shown < args.iterations:
            time.sleep(args.interval)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("top", help="live view of a deployment, from its HTTP /metrics")
    t.add_argument("--url", required=True, help="the router's HTTP base URL, e.g. http://127.0.0.1:8000")
    t.add_argument("--interval", type=float, default=1.0)
    t.add_argument("--iterations", type=int, default=None, help="screens to show (default: until Ctrl-C)")
    t.add_argument("--clear", action="store_true", help="redraw in place")
    t.set_defaults(func=cmd_top)
