"""Prometheus metrics of one router: vLLM's set under `pdserve:`, plus the disaggregated ones.

Names, meanings and bucket edges follow vLLM v1 (vllm/v1/metrics/loggers.py), with the
`vllm:` prefix replaced by `pdserve:`. Each router owns a `CollectorRegistry` (never the
process-global one, so two routers in one process, as in tests, do not collide).

Request metrics are observed as each request's stream ends (`RequestTimer`), labelled by
`model_name` and the `worker` that decoded it; worker gauges (`num_requests_running`,
`num_requests_waiting`, `kv_cache_usage_perc`) are read from the latest load reports when
scraped, labelled by `worker` and `role`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.engine.core.outputs import LoadReport
from pdserve.router.events import Completion, RouterStats
from pdserve.router.routing import RouteDecision

PREFIX = "pdserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket edges.
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
TOKEN_LATENCY_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip
# KV transfer: from a millisecond (gRPC on loopback, small prompts) to a minute.
KV_TRANSFER_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
]
FINISH_REASONS = ("stop", "length", "abort")
REQUEST_LABELS = ["model_name", "worker"]  # the worker that decoded the request
WORKER_LABELS = ["model_name", "worker", "role"]
# attribute, name, documentation (vLLM's), for the per-worker token counters
WORKER_COUNTERS = [
    ("prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
    ("generation_tokens", "generation_tokens", "Number of generation tokens processed."),
    ("cache_queries", "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("cache_hits", "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
]


def _request_histograms(max_model_len: int) -> list[tuple[str, str, str, list]]:
    """attribute, name, documentation (vLLM's) and buckets of the per-request histograms."""
    tokens = build_1_2_5_buckets(max_model_len)
    return [
        ("ttft", "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
        (
            "itl",
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            TOKEN_LATENCY_BUCKETS,
        ),
        (
            "tpot",
            "time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            TOKEN_LATENCY_BUCKETS,
        ),
        (
            "e2e",
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ),
        (
            "queue",
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ),
        (
            "prefill_time",
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ),
        (
            "decode_time",
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ),
        ("prompt_len", "request_prompt_tokens", "Number of prefill tokens processed.", tokens),
        ("generation_len", "request_generation_tokens", "Number of generation tokens processed.", tokens),
        ("max_tokens", "request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens),
    ]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def routing_reason(decision: RouteDecision) -> str:
    """Why a request went where it went: prefilled on its decode worker, on a prefill
    worker that had part of the prompt cached, or on the one with the best headroom."""
    if decision.prefill_worker_id is None:
        return "local_prefill"
    return "cache_hit" if decision.num_prefix_hit_tokens > 0 else "headroom"


class _WorkerGauges(Collector):
    """Gauges read from the workers' latest load reports at scrape time."""

    def __init__(
        self, model_name: str, loads: Callable[[], dict[str, LoadReport]], queue_len: Callable[[], int]
    ):
        self.model_name = model_name
        self.loads = loads
        self.queue_len = queue_len

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model_name", "worker", "role"]
        running = GaugeMetricFamily(
            f"{PREFIX}num_requests_running", "Number of requests in model execution batches.", labels=labels
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}num_requests_waiting", "Number of requests waiting to be processed.", labels=labels
        )
        usage = GaugeMetricFamily(
            f"{PREFIX}kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels
        )
        for worker_id, load in sorted(self.loads().items()):
            values = [self.model_name, worker_id, load.role]
            running.add_metric(values, load.num_running)
            waiting.add_metric(values, load.num_waiting)
            used = load.num_total_blocks - load.num_free_blocks
            usage.add_metric(values, used / load.num_total_blocks if load.num_total_blocks else 0.0)
        queue = GaugeMetricFamily(
            f"{PREFIX}router_queue_length",
            "Requests waiting in the router's admission queue for decode headroom.",
            labels=["model_name"],
        )
        queue.add_metric([self.model_name], self.queue_len())
        yield from (running, waiting, usage, queue)


class FailureMetrics(Collector):
    """The router's failure counters (`RouterStats`: `pdserve:worker_failures_total`, ...)
    and each worker's liveness (`pdserve:worker_up`), read when scraped."""

    def __init__(self, model_name: str, stats: RouterStats, alive: Callable[[], dict[str, bool]]) -> None:
        self.model_name = model_name
        self.stats = stats
        self.alive = alive

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for field in dataclasses.fields(self.stats):
            name = field.name.removeprefix("num_")
            counter = CounterMetricFamily(f"{PREFIX}{name}", _STATS_DOCS[name], labels=["model_name"])
            counter.add_metric([self.model_name], getattr(self.stats, field.name))
            yield counter
        up = GaugeMetricFamily(
            f"{PREFIX}worker_up",
            "1 while the worker answers the router, 0 while it is lost.",
            labels=["model_name", "worker"],
        )
        for worker_id, alive in sorted(self.alive().items()):
            up.add_metric([self.model_name, worker_id], float(alive))
        yield up


_STATS_DOCS = {
    "worker_failures": "Workers lost (died, hung, or restarted between two polls).",
    "worker_restarts": "Lost workers that came back with a new instance id.",
    "worker_recoveries": "Lost workers that answered again (restarted or not).",
    "migrations": "Requests moved on after their decode worker was lost.",
    "prefill_retries": "Requests prefilled again after their prefill worker was lost before their KV landed.",
    "requests_failed_over_limit": "Requests ended UNAVAILABLE: past max_migrations, or no worker in time.",
    "transfer_pairs_broken": "Prefill/decode pairs whose KV transfer broke (nccl): never routed again.",
}


class RouterMetrics:
    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        loads: Callable[[], dict[str, LoadReport]],
        queue_len: Callable[[], int],
        transfer_backend: str = "grpc",
    ) -> None:
        self.model_name = model_name
        self.transfer_backend = transfer_backend
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_WorkerGauges(model_name, loads, queue_len))
        for attr, name, doc, buckets in _request_histograms(max_model_len):
            setattr(self, attr, self._histogram(name, doc, buckets, REQUEST_LABELS))
        for attr, name, doc in WORKER_COUNTERS:
            setattr(self, attr, self._counter(name, doc, WORKER_LABELS))
        self.success = self._counter(
            "request_success",
            "Count of successfully processed requests.",
            [*REQUEST_LABELS, "finished_reason"],
        )
        self.kv_transfer = self._histogram(
            "kv_transfer_seconds",
            "Histogram of the wait for a request's KV to land on its decode worker, in seconds.",
            KV_TRANSFER_BUCKETS,
            ["model_name", "backend"],
        )
        self.kv_transfer_bytes = self._counter(
            "kv_transfer_bytes",
            "Bytes of packed KV shipped from prefill to decode workers.",
            ["model_name", "backend"],
        )
        self.rejections = self._counter(
            "admission_rejections",
            "Requests refused for want of decode headroom (queue full or wait too long).",
            ["model_name"],
        )
        self.routing = self._counter(
            "routing_decisions", "Routing decisions by reason.", ["model_name", "reason"]
        )
        self.failures = self._counter(
            "request_failure", "Requests that ended in an error, by gRPC status code.", ["model_name", "code"]
        )
        for reason in FINISH_REASONS:
            self.success.labels(model_name, "", reason)  # present (at 0) from the start, as in vLLM
        self.rejections.labels(model_name)

    def _histogram(self, name: str, doc: str, buckets: list, labels: list[str]) -> Histogram:
        return Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=self.registry)

    def _counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(f"{PREFIX}{name}", doc, labels, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- what the router reports ---------------------------------------------------------
    def on_routed(self, decision: RouteDecision) -> None:
        self.routing.labels(self.model_name, routing_reason(decision)).inc()

    def on_rejected(self) -> None:
        self.rejections.labels(self.model_name).inc()

    def on_client_abort(self, decode_worker: str) -> None:
        """A client left before its request finished (the router aborted it on the workers)."""
        self.success.labels(self.model_name, decode_worker, "abort").inc()

    def on_failed(self, code: str) -> None:
        self.failures.labels(self.model_name, code).inc()

    def observe(self, timer: RequestTimer, done: Completion) -> None:
        """One finished request: its histograms and the token counters of its workers."""
        name, worker = self.model_name, timer.decode_worker or ""
        self.ttft.labels(name, worker).observe(done.ttft_ms / 1e3)
        self.e2e.labels(name, worker).observe(timer.elapsed())
        self.queue.labels(name, worker).observe(done.queue_ms / 1e3)
        self.prefill_time.labels(name, worker).observe(done.prefill_ms / 1e3)
        self.decode_time.labels(name, worker).observe(done.decode_ms / 1e3)
        self.prompt_len.labels(name, worker).observe(done.prompt_tokens)
        self.generation_len.labels(name, worker).observe(done.completion_tokens)
        self.max_tokens.labels(name, worker).observe(timer.max_tokens)
        if done.completion_tokens > 1:
            self.tpot.labels(name, worker).observe(done.decode_ms / 1e3 / (done.completion_tokens - 1))
        itl = self.itl.labels(name, worker)
        for gap in timer.token_gaps:
            itl.observe(gap)
        self.success.labels(name, worker, done.finish_reason).inc()
        prefill_worker, prefill_role = (
            timer.prefill_worker or worker,
            "prefill" if timer.prefill_worker else timer.decode_role,
        )
        self.prompt_tokens.labels(name, prefill_worker, prefill_role).inc(done.prompt_tokens)
        self.cache_queries.labels(name, prefill_worker, prefill_role).inc(done.prompt_tokens)
        self.cache_hits.labels(name, prefill_worker, prefill_role).inc(done.cached_tokens)
        self.generation_tokens.labels(name, worker, timer.decode_role).inc(done.completion_tokens)
        if timer.prefill_worker is not None:
            self.kv_transfer.labels(name, self.transfer_backend).observe(done.kv_transfer_ms / 1e3)
            self.kv_transfer_bytes.labels(name, self.transfer_backend).inc(timer.kv_bytes)


class RequestTimer:
    """One request's token arrival times, kept while it streams."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.start = time.perf_counter()
        self.last_token_at: float | None = None
        self.token_gaps: list[float] = []  # seconds between consecutive tokens
        self.prefill_worker: str | None = None
        self.decode_worker: str | None = None
        self.decode_role = "decode"
        self.kv_bytes = 0  # the KV shipped to the decode worker

    def on_tokens(self, count: int) -> None:
        """`count` tokens arrived in one chunk: the gap since the last one, shared between them."""
        now = time.perf_counter()
        if count and self.last_token_at is not None:
            self.token_gaps.extend([(now - self.last_token_at) / count] * count)
        elif count > 1:
            self.token_gaps.extend([0.0] * (count - 1))
        if count:
            self.last_token_at = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
