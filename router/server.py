"""The router's gRPC front door: `pdserve.v1.Generation`, health and reflection.

A thin servicer over `RouterCore`: it validates and converts messages, and maps
errors to status codes. Bad input is INVALID_ARGUMENT with a message naming the
field, before anything is routed; failures after the stream started arrive as
one `Error` event.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.engine.core.outputs import TokenLogprobs
from pdserve.engine.core.request import validate_prompt
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.grpc_strict import add_strict_service
from pdserve.router.request_limits import RequestLimits
from pdserve.router.service import Chunk, Completion, RouterCore, RouterError
from pdserve.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"]
SERVICE_NAME = SERVICE.full_name
_FINISH = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
}
MAX_REQUEST_ID_LEN = 256


# proto3 `optional` fields that map one to one onto SamplingParams (unset: the default)
_OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logprobs",
    "prompt_logprobs",
    "n",
)


def _logprobs_proto(logprobs: list[TokenLogprobs] | None) -> list[generate_pb2.TokenLogprob]:
    if not logprobs:
        return []
    return [
        generate_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            rank=lp.rank,
            top=[generate_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def sampling_from_proto(msg: generate_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Proto -> SamplingParams; unset optional fields take the engine's defaults
    (`default_max_tokens` for max_tokens: the caller makes it fit the context)."""
    kwargs = {}
    for name in _OPTIONAL_SAMPLING_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    kwargs["max_tokens"] = msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens
    try:
        return SamplingParams(
            **kwargs, stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos
        )
    except ValueError as exc:
        raise RouterError("INVALID_ARGUMENT", f"sampling.{exc}") from exc


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(
        self, core: RouterCore, default_max_tokens: int = 16, limits: RequestLimits | None = None
    ) -> None:
        self.core = core
        self.default_max_tokens = default_max_tokens
        self.limits = limits or RequestLimits()

    def _parse(self, request: generate_pb2.GenerateRequest) -> tuple[str, list[int], SamplingParams]:
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise RouterError("INVALID_ARGUMENT", f"request_id: longer than {MAX_REQUEST_ID_LEN} characters")
        which = request.WhichOneof("input")
        if which is None:
            raise RouterError("INVALID_ARGUMENT", "input: give text or token_ids")
        if which == "text":
            if not request.text:
                raise RouterError("INVALID_ARGUMENT", "input.text: must not be empty")
            prompt = self.core.tokenize(request.text)
        else:
            prompt = list(request.token_ids.ids)
        try:
            validate_prompt(prompt, self.core.model.vocab_size, self.core.model.max_model_len)
        except ValueError as exc:
            raise RouterError("INVALID_ARGUMENT", f"input.{which}: {exc}") from exc
        # An unset max_tokens takes the default, cut to what the context leaves (as vLLM does);
        # an explicit one beyond the context is refused by the core, naming both numbers.
        room = self.core.model.max_model_len - len(prompt)
        params = sampling_from_proto(request.sampling, min(self.default_max_tokens, room))
        self.limits.check_stops(params)
        return request.request_id or self.core.new_request_id(), prompt, params

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        try:
            req_id, prompt, params = self._parse(request)
        except RouterError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
            return
        try:
            async for event in self.core.generate(req_id, prompt, params):
                if isinstance(event, Chunk):
                    yield generate_pb2.GenerateResponse(
                        request_id=req_id,
                        index=event.index,
                        chunk=generate_pb2.Chunk(
                            token_ids=event.token_ids,
                            text=event.text,
                            logprobs=_logprobs_proto(event.logprobs),
                            prompt_logprobs=_logprobs_proto(event.prompt_logprobs),
                        ),
                    )
                else:
                    yield generate_pb2.GenerateResponse(
                        request_id=req_id, index=event.index, complete=_complete_proto(event)
                    )
        except RouterError as exc:
            if exc.code in ("INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
            yield _error(req_id, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a worker failed mid-stream
            log.exception("request %s failed", req_id)
            yield _error(req_id, "INTERNAL", f"{type(exc).__name__}: {exc}")

    async def Abort(self, request, context):
        return generate_pb2.AbortResponse(found=await self.core.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        m = self.core.model
        info = generate_pb2.ModelInfo(
            model_name=m.name,
            vocab_size=m.vocab_size,
            max_model_len=m.max_model_len,
            block_size=m.block_size,
            num_prefill_workers=sum(role == "prefill" for role in self.core.worker_roles.values()),
            num_decode_workers=sum(role != "prefill" for role in self.core.worker_roles.values()),
        )
        if m.eos_token_id is not None:
            info.eos_token_id = m.eos_token_id
        return info


def _complete_proto(c: Completion) -> generate_pb2.Complete:
    return generate_pb2.Complete(
        finish_reason=_FINISH[c.finish_reason],
        usage=generate_pb2.Usage(
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
        ),
        timings=generate_pb2.Timings(
            queue_ms=c.queue_ms,
            prefill_ms=c.prefill_ms,
            kv_transfer_ms=c.kv_transfer_ms,
            decode_ms=c.decode_ms,
            ttft_ms=c.ttft_ms,
        ),
    )


def _error(req_id: str, code: str, message: str) -> generate_pb2.GenerateResponse:
    return generate_pb2.GenerateResponse(
        request_id=req_id,
        error=generate_pb2.Error(code=getattr(grpc.StatusCode, code).value[0], message=message),
    )


class RouterServer:
    """grpc.aio server hosting the Generation, health and reflection services."""

    def __init__(
        self,
        core: RouterCore,
        host: str = "127.0.0.1",
        port: int = 0,
        default_max_tokens: int = 16,
        limits: RequestLimits | None = None,
    ):
        self.core = core
        self.host = host
        self.port = port
        self.default_max_tokens = default_max_tokens
        self.limits = limits or RequestLimits()
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()

    @classmethod
    def from_config(cls, core: RouterCore, router_config: Any) -> RouterServer:
        """The server a deploy config's `router` section describes."""
        return cls(
            core,
            router_config.host,
            router_config.port,
            router_config.default_max_tokens,
            RequestLimits.from_config(router_config),
        )

    async def start(self) -> str:
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), *self.limits.grpc_server_options()],
            maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
        )
        # Requests arrive as bytes and are parsed by the handler: undecodable ones are
        # INVALID_ARGUMENT (a raising deserializer would make them UNKNOWN).
        add_strict_service(
            self.server,
            SERVICE,
            GenerationServicer(self.core, self.default_max_tokens, self.limits),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.host}")
        await self._set_health(False)
        await self.server.start()
        await self.core.start()
        log.info("router serving on %s:%d (%s)", self.host, self.port, self.limits.describe())
        return f"{self.host}:{self.port}"

    async def wait_workers_ready(self, timeout: float = 300.0) -> None:
        await self.core.wait_ready(timeout)
        await self._set_health(True)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    async def stop(self, grace: float = 1.0) -> None:
        await self.core.stop()
        if self.server is not None:
            await self.server.stop(grace)
