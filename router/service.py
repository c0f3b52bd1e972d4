"""The router, independent of gRPC and of Ray: `RouterCore`.

`RouterCore.generate()` takes a validated request and yields events: `Chunk`s of new
tokens and text, then one `Completion` (or raises `RouterError`). Two parts do the work:
a `WorkerMonitor` (router/worker_monitor.py) polls every worker and keeps the
`WorkerStateTracker` current, and a `RequestStream` (router/request_stream.py) per
request routes it through the policy and admission queue, drives the chosen workers and
turns their outputs into its stream.

Workers are reached through `WorkerClient`s (router/worker_client.py): typed calls on a
Ray actor or on an in-process object.

A broken KV transfer pair (nccl backend: a transfer between a prefill and a decode worker
failed part-way, e.g. the prefill worker stalled mid-send) cannot be mended without a new
process group. The first report of it (from either end, through the worker monitor) takes
the pair out of routing for good: requests whose KV was still to cross it are prefilled
again elsewhere (another prefill worker, or the decode worker itself); a prefill worker
with no working pair left leaves routing (`WorkerMonitor.keep_out`); `status()` names
every broken pair until the deployment is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pdserve.engine.core.outputs import EVERY_PEER, RequestOutput
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.admission import AdmissionController
from pdserve.router.chat_template import ChatTemplate, ChatTemplateError
from pdserve.router.events import Chunk, Completion, LifecycleLog, ModelSummary, RouterError, RouterStats
from pdserve.router.metrics import FailureMetrics, RequestTimer, RouterMetrics
from pdserve.router.parallel_sampling import generate_samples, is_sample_of
from pdserve.router.policy import Policy, make_policy
from pdserve.router.request_stream import RequestStream, StreamDeps
from pdserve.router.reservations import fits_in_cache
from pdserve.router.routing import RouteDecision, RouteRequest
from pdserve.router.worker_client import WorkerClient
from pdserve.router.worker_monitor import WorkerMonitor
from pdserve.router.worker_state import WorkerStateTracker

__all__ = ["Chunk", "Completion", "ModelSummary", "RouterCore", "RouterError"]

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 300  # of a worker's transfer failure, in status and messages
RESTART_TO_MEND_TRANSFER = "restart the deployment (pdserve down / up) to mend it"


class RouterCore:
    def __init__(
        self,
        model: ModelSummary,
        tokenizer: Tokenizer | None,
        policy: Policy,
        clients: dict[str, WorkerClient],
        worker_roles: dict[str, str],
        use_kv_events: bool = True,
        max_queue_len: int = 256,
        max_wait_s: float = 30.0,
        poll_timeout_s: float = 0.2,
        chat_template: ChatTemplate | None = None,
        transfer_backend: str = "grpc",
        max_bypasses: int = 16,
        worker_timeout_s: float = 5.0,
        max_migrations: int = 3,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.policy = policy
        self.worker_roles = worker_roles  # worker id -> "prefill" | "decode" | "both"
        self.tracker = WorkerStateTracker(use_kv_events=use_kv_events)
        self.stats = RouterStats()
        self.lifecycle = LifecycleLog(log)
        self.admission: AdmissionController[RouteRequest, RouteDecision] = AdmissionController(
            self._try_route,
            max_queue_len,
            max_wait_s,
            on_abandoned=lambda r, d: self.tracker.release(r.req_id),
            max_bypasses=max_bypasses,
            size_of=lambda r: r.num_prompt_tokens + r.max_tokens,
        )
        self.monitor = WorkerMonitor(
            clients,
            self.tracker,
            on_outputs=self._deliver,
            on_worker_lost=self._on_worker_lost,
            on_worker_back=self._on_worker_back,
            on_state_change=self.admission.notify_capacity,
            on_transfer_report=self.on_transfer_report,
            poll_timeout_s=poll_timeout_s,
            answer_timeout_s=worker_timeout_s,
            lifecycle=self.lifecycle,
        )
        self.metrics = RouterMetrics(
            model.name,
            model.max_model_len,
            lambda: self.tracker.loads,
            lambda: self.admission.num_waiting,
            transfer_backend,
        )
        self.metrics.registry.register(
            FailureMetrics(
                model.name, self.stats, lambda: {w: h.alive for w, h in self.monitor.health.items()}
            )
        )
        self._deps = StreamDeps(
            self.admission,
            clients,
            self.tracker,
            tokenizer,
            model.block_size,
            model.max_model_len,
            report_lost=self.monitor.mark_lost,
            lost_workers=self._lost_decode_workers,
            stats=self.stats,
            lifecycle=self.lifecycle,
            max_migrations=max_migrations,
        )
        self._streams: dict[str, RequestStream] = {}
        self.transfer_ranks: dict[int, str] = {}  # rank in the KV transfer group -> worker id
        self.broken_pairs: dict[str, str] = {}  # "prefill -> decode" -> why (for status)

    @classmethod
    def from_config(
        cls, model: ModelSummary, tokenizer: Tokenizer | None, clients: dict[str, WorkerClient],
        worker_roles: dict[str, str], router_config: Any, chat_template: ChatTemplate | None = None,
        transfer_backend: str = "grpc",
    ) -> RouterCore:  # fmt: skip
        """The router a deploy config's `router` section describes."""
        return cls(
            model,
            tokenizer,
            make_policy(router_config.policy, **router_config.policy_params),
            clients,
            worker_roles,
            use_kv_events=router_config.kv_events,
            max_queue_len=router_config.max_queue_len,
            max_wait_s=router_config.max_wait_s,
            chat_template=chat_template,
            transfer_backend=transfer_backend,
            max_bypasses=router_config.max_bypasses,
            worker_timeout_s=router_config.worker_timeout_s,
            max_migrations=router_config.max_migrations,
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        await self.monitor.start()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(self.monitor.ready.wait(), timeout)

    @property
    def ready(self) -> bool:
        return self.monitor.ready.is_set()

    async def stop(self) -> None:
        await self.monitor.stop()

    # -- what the monitor reports ---------------------------------------------------------
    def _deliver(self, worker_id: str, outputs: list[RequestOutput], kv_wait_ms: dict[str, float]) -> None:
        attempts = self._deps.attempts
        for out in outputs:
            # By the attempt's id: an attempt given up after a failure gets nothing more.
            stream = attempts.get(out.req_id)
            if stream is not None and stream.decode_worker_id == worker_id:
                stream.deliver(out, kv_wait_ms.get(out.req_id, 0.0))

    def _on_worker_lost(self, worker_id: str, reason: str) -> None:
        self.stats.num_worker_failures += 1
        for stream in list(self._streams.values()):
            stream.on_worker_lost(worker_id, reason)

    def _on_worker_back(self, worker_id: str, restarted: bool) -> None:
        self.stats.num_worker_recoveries += 1
        self.stats.num_worker_restarts += restarted

    def on_transfer_report(self, worker_id: str, rank: int, broken_peers: dict[int, str]) -> None:
        """A worker's rank in the KV transfer group and the peers it can no longer transfer
        with (every poll; a peer whose rank is not known yet is named by a later one;
        `EVERY_PEER`: all the workers of the other role)."""
        self.transfer_ranks[rank] = worker_id
        sender = self.worker_roles[worker_id] == "prefill"
        for peer_rank, why in broken_peers.items():
            if peer_rank == EVERY_PEER:
                other_role = "decode" if sender else "prefill"
                peers = [w for w, role in self.worker_roles.items() if role == other_role]
            else:
                peers = [self.transfer_ranks[peer_rank]] if peer_rank in self.transfer_ranks else []
            first_line = why.strip().splitlines()[0] if why.strip() else "no reason given"
            for peer in peers:
                pair = (worker_id, peer) if sender else (peer, worker_id)
                if pair not in self.tracker.broken_pairs:
                    self.on_pair_broken(*pair, f"{worker_id} reports: {first_line[:MAX_REASON_CHARS]}")

    def on_pair_broken(self, prefill_worker_id: str, decode_worker_id: str, why: str) -> None:
        """Never route KV from `prefill_worker_id` to `decode_worker_id` again; move the
        requests whose KV was to cross; a prefill worker with no pair left leaves routing.
        Said once, counted once per pair."""
        pair = (prefill_worker_id, decode_worker_id)
        if pair in self.tracker.broken_pairs:
            return
        self.tracker.broken_pairs.add(pair)
        message = f"KV transfer {prefill_worker_id} -> {decode_worker_id} broken ({why})"
        self.broken_pairs[f"{prefill_worker_id} -> {decode_worker_id}"] = message
        self.stats.num_transfer_pairs_broken += 1
        self.lifecycle.record(
            logging.ERROR, "%s; the pair is not used again: %s", message, RESTART_TO_MEND_TRANSFER
        )
        for stream in list(self._streams.values()):
            stream.on_pair_broken(prefill_worker_id, decode_worker_id, why)
        decode_workers = [w for w, role in self.worker_roles.items() if role == "decode"]
        if all((prefill_worker_id, d) in self.tracker.broken_pairs for d in decode_workers):
            self.monitor.keep_out(
                prefill_worker_id,
                f"its KV transfer to every decode worker broke (last: {message}); {RESTART_TO_MEND_TRANSFER}",
            )
        self.admission.notify_capacity()  # waiting requests may route another way now

    def _lost_decode_workers(self) -> str:
        health = self.monitor.health
        return "; ".join(
            f"{w} ({health[w].lost_reason})"
            for w, role in self.worker_roles.items()
            if role != "prefill" and not health[w].alive
        )

    @property
    def serving(self) -> bool:
        """Workers reported, and a decode-capable one is alive (without a prefill worker,
        the policies prefill on the decode worker)."""
        return self.ready and any(
            self.monitor.is_alive(w) for w, role in self.worker_roles.items() if role != "prefill"
        )

    def _try_route(self, request: RouteRequest) -> RouteDecision | None:
        decision = self.policy.route(request, self.tracker)
        if decision is not None:
            self.tracker.on_routed(request, decision)
            self.metrics.on_routed(decision)
        return decision

    # -- requests ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RouterError("INVALID_ARGUMENT", "input.text: this model has no tokenizer; send token_ids")
        return self.tokenizer.encode(text)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """A chat's prompt tokens, rendered as transformers' `apply_chat_template` renders it."""
        if self.tokenizer is None or self.chat_template is None:
            raise RouterError(
                "INVALID_ARGUMENT",
                "messages: this model has no chat template (tokenizer_config.json: chat_template)",
            )
        try:
            return self.chat_template.encode(self.tokenizer, messages, add_generation_prompt)
        except ChatTemplateError as exc:
            raise RouterError("INVALID_ARGUMENT", str(exc)) from exc

    async def generate(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk | Completion]:
        """Stream one request (its n samples when params.n > 1). Cancelling the consumer
        aborts it on every worker."""
        if params.n > 1:
            async for event in generate_samples(self._generate_one, req_id, prompt_token_ids, params):
                yield event
            return
        async for event in self._generate_one(req_id, prompt_token_ids, params):
            yield event

    async def _generate_one(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk | Completion]:
        if req_id in self._streams or req_id in self._deps.attempts:  # or a moved request's attempt
            raise RouterError("ALREADY_EXISTS", f"request_id {req_id!r} is already running")
        if not self.ready:
            raise RouterError("UNAVAILABLE", "workers are not ready yet")
        self.check_fits(len(prompt_token_ids), params.max_tokens)
        stream = RequestStream(req_id, prompt_token_ids, params, self._deps)
        self._streams[req_id] = stream
        timer = RequestTimer(params.max_tokens)
        completed = False
        try:
            async for event in stream.events():
                if isinstance(event, Chunk):
                    timer.on_tokens(len(event.token_ids))
                else:
                    completed = True
                    self._observe(stream, timer, event)
                yield event
        except RouterError as exc:
            if exc.code == "RESOURCE_EXHAUSTED":
                self.metrics.on_rejected()
            else:
                self.metrics.on_failed(exc.code)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if not completed:  # the client left: counted as vLLM counts an abort
                self.metrics.on_client_abort(stream.decode_worker_id or "")
            raise
        finally:
            self._streams.pop(req_id, None)

    def _observe(self, stream: RequestStream, timer: RequestTimer, done: Completion) -> None:
        timer.prefill_worker = stream.prefill_worker_id
        timer.decode_worker = stream.decode_worker_id
        timer.decode_role = self.worker_roles.get(stream.decode_worker_id or "", "decode")
        timer.kv_bytes = stream.kv_bytes
        self.metrics.observe(timer, done)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse at once (INVALID_ARGUMENT, naming the numbers) a request that can never
        run: beyond the model's context, as vLLM words it, or beyond the KV cache of
        every decode-capable worker. Anything else that finds no room waits for it."""
        total = num_prompt_tokens + max_tokens
        if total > self.model.max_model_len:
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.max_tokens: this model's maximum context length is {self.model.max_model_len} "
                f"tokens. However, you requested {total} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the prompt or max_tokens.",
            )
        decode_reports = [r for r in self.tracker.loads.values() if r.role != "prefill"]
        if decode_reports and not any(fits_in_cache(r, total) for r in decode_reports):
            largest = max(decode_reports, key=lambda r: r.num_total_blocks * r.block_size)
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.max_tokens: the request needs KV cache for {total} tokens ({num_prompt_tokens} "
                f"in the prompt, {max_tokens} in the completion), but the largest decode worker's cache "
                f"holds {largest.num_total_blocks * largest.block_size} tokens ({largest.num_total_blocks} "
                f"blocks of {largest.block_size}). Please reduce the prompt or max_tokens.",
            )

    async def abort(self, req_id: str) -> bool:
        """Abort a request (all its samples); False when none runs under that id."""
        streams = [s for child_id, s in self._streams.items() if is_sample_of(child_id, req_id)]
        for stream in streams:
            await stream.abort_everywhere()
            stream.deliver(RequestOutput(stream.req_id, finished=True, finish_reason="abort"), 0.0)
        return bool(streams)

    def status(self, events_since: int = 0) -> dict[str, Any]:
        """Workers (load, liveness), counters, and the lifecycle events after `events_since`."""
        return {
            "ready": self.ready,
            "serving": self.serving,
            "broken_transfer_pairs": dict(self.broken_pairs),
            "num_streams": len(self._streams),
            "num_waiting_admission": self.admission.num_waiting,
            "stats": vars(self.stats).copy(),
            "events": [vars(e) for e in self.lifecycle.since(events_since)],
            "workers": {
                w: {
                    "role": self.worker_roles[w],
                    **(vars(r) if (r := self.tracker.loads.get(w)) else {}),
                    **vars(self.monitor.health[w]),
                }
                for w in self.worker_roles
            },
        }
